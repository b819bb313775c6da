"""Serving: the model service (service.py), the REST API (app.py) and the web page (page.py).
Imports inference only — never the training engine."""

from medsight.serve.app import create_app, serve
from medsight.serve.service import MAX_UPLOAD_BYTES, NOTICE, Service

__all__ = ["create_app", "serve", "Service", "NOTICE", "MAX_UPLOAD_BYTES"]
