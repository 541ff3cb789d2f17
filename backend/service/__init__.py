"""Use cases of the backend: one unit of work each, called by the API and the dispatcher."""
