"""Serving: the model service (service.py), micro-batches (batching.py), the REST API (app.py) and the web
page (page.py).
Imports inference only — never the training engine."""

from medsight.serve.app import create_app, serve
from medsight.serve.batching import BatchSettings, MicroBatcher, ServerBusyError
from medsight.serve.service import MAX_UPLOAD_BYTES, NOTICE, Service

__all__ = ["create_app", "serve", "Service", "BatchSettings", "MicroBatcher", "ServerBusyError", "NOTICE",
           "MAX_UPLOAD_BYTES"]
