"""A fake Stripe API server for tests and local development (``python -m billing.fake_stripe``).

It speaks Stripe's v1 wire format — form-encoded bracketed params, Bearer auth, Stripe's error
JSON and statuses, ``Request-Id`` headers, ``Idempotency-Key`` replays — for the parts Bulkhead
uses: customers, billing meters and billing meter events. Faults (429/5xx, slow answers, an
answer lost after the event was recorded) can be injected from Python or over HTTP, and
``/_fake/*`` shows what was received. See ``server.FakeStripe``.
"""

from .errors import StripeError
from .form import FormDecodeError, decode_form
from .server import FakeStripe
from .state import Fault

__all__ = ["FakeStripe", "Fault", "FormDecodeError", "StripeError", "decode_form"]
