"""study: orchestration and entry points (``python -m study.<command>``)."""
