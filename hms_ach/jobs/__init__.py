"""Scheduled jobs: their settings (``jobs:`` in channels.yaml), the credential-expiry scan and
housekeeping. The scheduler that runs them is :mod:`hms_ach.scheduler`."""
