"""The HTTP front-end: FastAPI routes, request/response bodies, errors, middleware."""
