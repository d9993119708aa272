"""Case workflows on FHIR Task: review cases (and, later, complaints) assigned from the workforce store.

``workflow.py`` runs a ``kind: workflow`` file, ``assignment.py`` chooses the next available reviewer,
``api.py`` is the HTTP layer under ``/api/v1/review`` (docs/review-cases.md).
"""
