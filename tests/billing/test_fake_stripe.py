"""The fake Stripe server, driven by the official SDK (stripe 16.1.0) and by raw HTTP.

SDK retry behaviour observed here (``HTTPClient._should_retry`` in stripe 16.1.0):
- ``Stripe-Should-Retry: true|false`` decides when present;
- otherwise 409 and every status >= 500 are retried, every other status is not — so a plain
  429 (``rate_limit``) is never retried, a 429 ``lock_timeout`` (which carries
  ``Stripe-Should-Retry: true``) is; ``Retry-After`` is ignored;
- every POST carries an ``Idempotency-Key`` (generated when not given), reused on retries,
  so a retried meter event after a lost answer is replayed, not recorded twice;
- retries sleep 0.5 s to 1 s each (backoff floor), so the retry tests take a few seconds.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest
import stripe

from billing.fake_stripe import FakeStripe, FormDecodeError, decode_form

DAY = 86_400
EVENT = "sandbox_seconds"


class Clock:
    """A settable clock for the fake (Unix seconds)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def fake(clock: Clock) -> AsyncIterator[FakeStripe]:
    server = FakeStripe(clock=clock)
    await server.start()
    yield server
    await server.close()


MakeClient = Callable[..., stripe.StripeClient]


@pytest.fixture
async def make_client(fake: FakeStripe) -> AsyncIterator[MakeClient]:
    """Async SDK clients on the fake: ``make_client(retries=0, api_key=None)``."""
    http_clients: list[stripe.AIOHTTPClient] = []

    def make(retries: int = 0, api_key: str | None = None) -> stripe.StripeClient:
        assert fake.url is not None
        http_client = stripe.AIOHTTPClient()
        http_clients.append(http_client)
        return stripe.StripeClient(
            api_key or fake.secret_key,
            base_addresses={"api": fake.url, "meter_events": fake.url},
            max_network_retries=retries,
            http_client=http_client,
        )

    yield make
    for http_client in http_clients:
        await http_client.close_async()


@pytest.fixture
async def client(make_client: MakeClient) -> stripe.StripeClient:
    return make_client()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def new_customer(client: stripe.StripeClient, email: str = "a@example.com") -> str:
    customer = await client.v1.customers.create_async({"email": email})
    return str(customer.id)


def response_of(obj: stripe.StripeObject) -> stripe.StripeResponse:
    """The HTTP answer an SDK object came from (status, headers, request and idempotency ids)."""
    assert obj.last_response is not None
    return obj.last_response


def event_params(customer: str, value: str = "1", **extra: Any) -> Any:
    return {
        "event_name": EVENT,
        "payload": {"stripe_customer_id": customer, "value": value},
        **extra,
    }


# -- the bracketed-key decoder ------------------------------------------------------------


def test_decode_nested_hashes_and_lists() -> None:
    body = (
        "payload[stripe_customer_id]=cus_123&payload[value]=42&metadata[a]=b"
        "&expand[]=x&expand[]=y&items[0][price]=p1&items[1][price]=p2&items[1][quantity]=3"
        "&tags[0]=t0&tags[1]=t1&name=Jo%20Doe&empty="
    )
    assert decode_form(body) == {
        "payload": {"stripe_customer_id": "cus_123", "value": "42"},
        "metadata": {"a": "b"},
        "expand": ["x", "y"],
        "items": [{"price": "p1"}, {"price": "p2", "quantity": "3"}],
        "tags": ["t0", "t1"],
        "name": "Jo Doe",
        "empty": "",
    }


def test_decode_keeps_free_form_hashes_and_sparse_indexes() -> None:
    assert decode_form("metadata[0]=a&metadata[1]=b") == {"metadata": {"0": "a", "1": "b"}}
    assert decode_form("a[0]=x&a[2]=y") == {"a": {"0": "x", "2": "y"}}
    assert decode_form("a=1&a=2") == {"a": "2"}
    assert decode_form("a[b][c][d]=1") == {"a": {"b": {"c": {"d": "1"}}}}


@pytest.mark.parametrize("body", ["a=1&a[b]=2", "a[b]=2&a=1", "a[b=1", "[a]=1", "a[][b]=1", "a]=1"])
def test_decode_rejects_conflicting_or_malformed_keys(body: str) -> None:
    with pytest.raises(FormDecodeError):
        decode_form(body)


async def test_malformed_body_is_a_stripe_400(
    fake: FakeStripe, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        f"{fake.url}/v1/customers",
        data="metadata=x&metadata[a]=b",
        headers={
            "Authorization": f"Bearer {fake.secret_key}",
            "Content-Type": "application/x-www-form-urlencoded",
        },
    ) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "metadata[a]"


# -- wire format: auth, errors, headers ---------------------------------------------------


async def test_missing_and_wrong_api_key_answer_401(
    fake: FakeStripe, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{fake.url}/v1/customers/cus_x") as response:
        assert response.status == 401
        assert response.headers["Request-Id"].startswith("req_")
        error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("You did not provide an API key.")
    wrong = "sk_test_wrongwrongwrong1234"
    async with http.get(
        f"{fake.url}/v1/customers/cus_x", headers={"Authorization": f"Bearer {wrong}"}
    ) as response:
        assert response.status == 401
        error = (await response.json())["error"]
    assert error["message"] == "Invalid API Key provided: sk_test_***************1234"
    assert wrong not in json.dumps(error)


async def test_basic_auth_unknown_url_and_json_bodies(
    fake: FakeStripe, http: aiohttp.ClientSession
) -> None:
    token = base64.b64encode(f"{fake.secret_key}:".encode()).decode()
    basic = {"Authorization": f"Basic {token}"}  # what `curl -u sk_test_…:` sends
    async with http.post(f"{fake.url}/v1/customers", data={"name": "Ann"}, headers=basic) as r:
        assert r.status == 200
        customer = await r.json()
        assert r.headers["Request-Id"].startswith("req_")
        assert r.headers["Stripe-Version"]
    assert customer["object"] == "customer" and customer["name"] == "Ann"
    assert customer["id"].startswith("cus_") and customer["livemode"] is False
    async with http.get(f"{fake.url}/v1/charges", headers=basic) as r:
        assert r.status == 404
        error = (await r.json())["error"]
    assert error["message"].startswith("Unrecognized request URL (GET: /v1/charges)")
    async with http.post(f"{fake.url}/v1/customers", json={"name": "Ann"}, headers=basic) as r:
        assert r.status == 400
        assert "Content-Type application/json" in (await r.json())["error"]["message"]


async def test_auth_failure_raises_authentication_error(make_client: MakeClient) -> None:
    client = make_client(api_key="sk_test_not_the_right_key")
    with pytest.raises(stripe.AuthenticationError) as caught:
        await client.v1.customers.create_async({"email": "a@example.com"})
    assert caught.value.http_status == 401
    assert "Invalid API Key provided" in str(caught.value.user_message)


# -- customers ----------------------------------------------------------------------------


async def test_customer_create_and_retrieve(fake: FakeStripe, client: stripe.StripeClient) -> None:
    created = await client.v1.customers.create_async(
        {"email": "ann@example.com", "name": "Ann", "metadata": {"plan": "metered"}}
    )
    assert created.id.startswith("cus_")
    assert created.object == "customer"
    assert created.email == "ann@example.com" and created.name == "Ann"
    assert created.metadata is not None and created.metadata.to_dict() == {"plan": "metered"}
    assert abs(created.created - time.time()) < 5
    fetched = await client.v1.customers.retrieve_async(created.id)
    assert fetched.id == created.id and fetched.email == "ann@example.com"
    assert fake.customers[0]["id"] == created.id

    with pytest.raises(stripe.InvalidRequestError) as caught:
        await client.v1.customers.retrieve_async("cus_missing")
    assert caught.value.http_status == 404
    assert caught.value.code == "resource_missing"
    assert caught.value.user_message == "No such customer: 'cus_missing'"

    with pytest.raises(stripe.InvalidRequestError) as unknown:
        await client.v1.customers.create_async({"email": "x@example.com", "colour": "red"})  # type: ignore[arg-type]
    assert unknown.value.code == "parameter_unknown" and unknown.value.param == "colour"


# -- meter events -------------------------------------------------------------------------


async def test_meter_event_accepted_without_meters(
    fake: FakeStripe, client: stripe.StripeClient, clock: Clock
) -> None:
    customer = await new_customer(client)
    event = await client.v1.billing.meter_events.create_async(
        event_params(customer, "42", identifier="job_1")
    )
    assert event.object == "billing.meter_event"
    assert event.event_name == EVENT and event.identifier == "job_1"
    assert event.payload is not None
    assert event.payload.to_dict() == {"stripe_customer_id": customer, "value": "42"}
    assert event.timestamp == int(clock.now) and event.livemode is False
    generated = await client.v1.billing.meter_events.create_async(
        {"event_name": "anything_goes", "payload": {"stripe_customer_id": customer, "value": "1"}}
    )
    assert generated.identifier and generated.identifier != "job_1"
    assert fake.totals() == {(customer, EVENT): 42, (customer, "anything_goes"): 1}


async def test_meters_restrict_event_names_and_map_payload_keys(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    customer = await new_customer(client)
    meter = await client.v1.billing.meters.create_async(
        {
            "display_name": "Sandbox seconds",
            "event_name": EVENT,
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
            "value_settings": {"event_payload_key": "value"},
        }
    )
    assert meter.id.startswith("mtr_") and meter.object == "billing.meter"
    assert meter.status == "active" and meter.default_aggregation.formula == "sum"
    assert (await client.v1.billing.meters.retrieve_async(meter.id)).event_name == EVENT
    other = await client.v1.billing.meters.create_async(
        {
            "display_name": "GPU ms",
            "event_name": "gpu_ms",
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"event_payload_key": "cust", "type": "by_id"},
            "value_settings": {"event_payload_key": "ms"},
        }
    )
    listed = await client.v1.billing.meters.list_async()
    assert {m.id for m in listed.data} == {meter.id, other.id}

    await client.v1.billing.meter_events.create_async(event_params(customer, "5"))
    await client.v1.billing.meter_events.create_async(
        {"event_name": "gpu_ms", "payload": {"cust": customer, "ms": "7"}}
    )
    with pytest.raises(stripe.InvalidRequestError) as no_meter:
        await client.v1.billing.meter_events.create_async(
            {"event_name": "unmetered", "payload": {"stripe_customer_id": customer, "value": "1"}}
        )
    assert no_meter.value.code == "no_meter" and no_meter.value.param == "event_name"
    with pytest.raises(stripe.InvalidRequestError) as no_customer:
        await client.v1.billing.meter_events.create_async(
            {"event_name": "gpu_ms", "payload": {"stripe_customer_id": customer, "ms": "1"}}
        )
    assert no_customer.value.code == "meter_event_no_customer_defined"
    assert no_customer.value.param == "payload[cust]"
    with pytest.raises(stripe.InvalidRequestError) as duplicate_meter:
        await client.v1.billing.meters.create_async(
            {"display_name": "x", "event_name": EVENT, "default_aggregation": {"formula": "sum"}}
        )
    assert duplicate_meter.value.param == "event_name"
    assert fake.totals() == {(customer, EVENT): 5, (customer, "gpu_ms"): 7}


async def test_duplicate_identifier_rejected_for_24_hours(
    fake: FakeStripe, client: stripe.StripeClient, clock: Clock
) -> None:
    customer = await new_customer(client)
    await client.v1.billing.meter_events.create_async(event_params(customer, identifier="job_1"))
    with pytest.raises(stripe.InvalidRequestError) as caught:
        # another event name, same identifier: uniqueness is per account
        await client.v1.billing.meter_events.create_async(
            {
                "event_name": "other",
                "identifier": "job_1",
                "payload": {"stripe_customer_id": customer, "value": "3"},
            }
        )
    assert caught.value.http_status == 400
    assert caught.value.code == "meter_event_duplicate_identifier"
    assert caught.value.param == "identifier"
    clock.now += DAY - 1
    with pytest.raises(stripe.InvalidRequestError):
        await client.v1.billing.meter_events.create_async(
            event_params(customer, identifier="job_1")
        )
    clock.now += 2
    await client.v1.billing.meter_events.create_async(event_params(customer, identifier="job_1"))
    assert len(fake.meter_events) == 2


@pytest.mark.parametrize("value", ["1.5", "-3", "abc", "", "1e3", " 4", "99999999999999999999"])
async def test_non_integer_values_rejected(
    fake: FakeStripe, client: stripe.StripeClient, value: str
) -> None:
    customer = await new_customer(client)
    with pytest.raises(stripe.InvalidRequestError) as caught:
        await client.v1.billing.meter_events.create_async(event_params(customer, value))
    assert caught.value.http_status == 400
    assert caught.value.code in ("meter_event_invalid_value", "meter_event_value_too_many_digits")
    assert caught.value.param == "payload[value]"
    assert fake.meter_events == []


async def test_unknown_customer_and_missing_params_rejected(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    with pytest.raises(stripe.InvalidRequestError) as caught:
        await client.v1.billing.meter_events.create_async(event_params("cus_nobody"))
    assert caught.value.http_status == 400
    assert caught.value.code == "meter_event_customer_not_found"
    assert caught.value.param == "payload[stripe_customer_id]"
    assert "cus_nobody" in str(caught.value.user_message)
    with pytest.raises(stripe.InvalidRequestError) as missing:
        await client.v1.billing.meter_events.create_async({"payload": {"value": "1"}})  # type: ignore[typeddict-item]
    assert missing.value.code == "parameter_missing" and missing.value.param == "event_name"
    assert fake.meter_events == []


async def test_timestamp_window(
    fake: FakeStripe, client: stripe.StripeClient, clock: Clock
) -> None:
    customer = await new_customer(client)
    now = int(clock.now)
    for accepted in (now - 35 * DAY, now + 300, now - 60):
        event = await client.v1.billing.meter_events.create_async(
            event_params(customer, timestamp=accepted)
        )
        assert event.timestamp == accepted
    rejected = {
        now - 35 * DAY - 1: "timestamp_too_far_in_past",
        now + 301: "timestamp_in_future",
    }
    for timestamp, code in rejected.items():
        with pytest.raises(stripe.InvalidRequestError) as caught:
            await client.v1.billing.meter_events.create_async(
                event_params(customer, timestamp=timestamp)
            )
        assert caught.value.code == code and caught.value.param == "timestamp"
    with pytest.raises(stripe.InvalidRequestError) as not_int:
        await client.v1.billing.meter_events.create_async(
            event_params(customer, timestamp="soon")  # type: ignore[arg-type]
        )
    assert not_int.value.code == "parameter_invalid_integer"
    assert len(fake.meter_events) == 3


# -- idempotency --------------------------------------------------------------------------


async def test_idempotency_key_replays_through_the_sdk(
    fake: FakeStripe, client: stripe.StripeClient, clock: Clock
) -> None:
    customer = await new_customer(client)
    params = event_params(customer, "9")
    first = await client.v1.billing.meter_events.create_async(
        params, options={"idempotency_key": "usage-job-1"}
    )
    again = await client.v1.billing.meter_events.create_async(
        params, options={"idempotency_key": "usage-job-1"}
    )
    assert again.identifier == first.identifier  # the generated identifier, replayed
    assert response_of(first).headers.get("Idempotent-Replayed") is None
    assert response_of(again).headers["Idempotent-Replayed"] == "true"
    assert response_of(again).headers["Original-Request"] == response_of(first).request_id
    assert response_of(again).idempotency_key == "usage-job-1"
    assert fake.totals() == {(customer, EVENT): 9}

    with pytest.raises(stripe.IdempotencyError) as other_params:
        await client.v1.billing.meter_events.create_async(
            event_params(customer, "10"), options={"idempotency_key": "usage-job-1"}
        )
    assert other_params.value.http_status == 400
    assert "same parameters" in str(other_params.value.user_message)
    with pytest.raises(stripe.IdempotencyError) as other_endpoint:
        await client.v1.customers.create_async({}, options={"idempotency_key": "usage-job-1"})
    assert "same endpoint" in str(other_endpoint.value.user_message)

    clock.now += DAY + 1  # keys are remembered for 24 hours
    later = await client.v1.billing.meter_events.create_async(
        event_params(customer, "10"), options={"idempotency_key": "usage-job-1"}
    )
    assert response_of(later).headers.get("Idempotent-Replayed") is None
    assert fake.totals() == {(customer, EVENT): 19}
    replayed = [r for r in fake.requests if r["replayed"]]
    assert len(replayed) == 1 and replayed[0]["idempotency_key"] == "usage-job-1"


async def test_failed_requests_are_not_saved_and_concurrent_use_is_409(
    fake: FakeStripe, http: aiohttp.ClientSession, client: stripe.StripeClient
) -> None:
    customer = await new_customer(client)
    headers = {"Authorization": f"Bearer {fake.secret_key}", "Idempotency-Key": "k1"}
    bad = {"event_name": EVENT, "payload[stripe_customer_id]": customer, "payload[value]": "x"}
    good = {**bad, "payload[value]": "4"}
    url = f"{fake.url}/v1/billing/meter_events"
    async with http.post(url, data=bad, headers=headers) as r:
        assert r.status == 400
    async with http.post(url, data=good, headers=headers) as r:  # the 400 was not saved
        assert r.status == 200

    fake.inject(status=None, delay_s=0.3)  # a slow request holds its key
    headers["Idempotency-Key"] = "k2"

    async def post() -> tuple[int, dict[str, Any]]:
        async with http.post(url, data={**good, "identifier": "slow"}, headers=headers) as r:
            return r.status, await r.json()

    slow = asyncio.create_task(post())
    await asyncio.sleep(0.1)
    status, body = await post()
    assert status == 409
    assert body["error"]["type"] == "idempotency_error"
    assert body["error"]["code"] == "idempotency_key_in_use"
    assert (await slow)[0] == 200
    assert fake.totals() == {(customer, EVENT): 8}


# -- faults and the SDK's retries ---------------------------------------------------------


async def test_plain_429_is_not_retried_by_the_sdk(
    fake: FakeStripe, make_client: MakeClient
) -> None:
    client = make_client(retries=3)
    customer = await new_customer(client)
    fault = fake.inject(status=429, count=1, retry_after=1)
    with pytest.raises(stripe.RateLimitError) as caught:
        await client.v1.billing.meter_events.create_async(event_params(customer))
    assert caught.value.http_status == 429
    body = caught.value.json_body  # RateLimitError leaves .code unset
    assert isinstance(body, dict) and body["error"]["code"] == "rate_limit"
    assert caught.value.headers is not None
    assert "Stripe-Should-Retry" not in caught.value.headers
    assert caught.value.headers["Retry-After"] == "1"
    assert fault.fired == 1
    assert [r["status"] for r in fake.requests if r["path"].endswith("meter_events")] == [429]
    assert fake.meter_events == []


async def test_lock_timeout_429_and_500_are_retried_by_the_sdk(
    fake: FakeStripe, make_client: MakeClient
) -> None:
    client = make_client(retries=2)
    customer = await new_customer(client)
    fake.inject(status=429, code="lock_timeout")  # sends Stripe-Should-Retry: true
    await client.v1.billing.meter_events.create_async(event_params(customer, "2"))
    fake.inject(status=500)
    await client.v1.billing.meter_events.create_async(event_params(customer, "3"))
    statuses = [r["status"] for r in fake.requests if r["path"].endswith("meter_events")]
    assert statuses == [429, 200, 500, 200]
    assert fake.totals() == {(customer, EVENT): 5}


async def test_500_with_should_retry_false_and_no_retries_configured(
    fake: FakeStripe, make_client: MakeClient
) -> None:
    retrying = make_client(retries=2)
    customer = await new_customer(retrying)
    fake.inject(status=500, should_retry=False)
    with pytest.raises(stripe.APIError) as caught:
        await retrying.v1.billing.meter_events.create_async(event_params(customer))
    assert caught.value.http_status == 500
    fake.inject(status=503)
    with pytest.raises(stripe.APIError):
        await make_client(retries=0).v1.billing.meter_events.create_async(event_params(customer))
    assert [r["status"] for r in fake.requests if r["path"].endswith("meter_events")] == [500, 503]
    assert fake.meter_events == []


async def test_lost_answer_is_replayed_on_sdk_retry_and_counted_once(
    fake: FakeStripe, make_client: MakeClient
) -> None:
    client = make_client(retries=2)
    customer = await new_customer(client)
    fake.inject(status=500, after_apply=True)
    event = await client.v1.billing.meter_events.create_async(
        event_params(customer, "11", identifier="job_7")
    )
    assert event.identifier == "job_7"
    assert response_of(event).headers["Idempotent-Replayed"] == "true"
    attempts = [r for r in fake.requests if r["path"].endswith("meter_events")]
    assert [(r["status"], r["replayed"]) for r in attempts] == [(500, False), (200, True)]
    assert attempts[0]["idempotency_key"] == attempts[1]["idempotency_key"]
    assert fake.totals() == {(customer, EVENT): 11}
    assert len(fake.meter_events) == 1


async def test_lost_answer_then_fresh_retry_hits_the_duplicate_identifier(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    customer = await new_customer(client)
    fake.inject(status=500, after_apply=True)
    with pytest.raises(stripe.APIError):
        await client.v1.billing.meter_events.create_async(
            event_params(customer, "6", identifier="job_8")
        )
    # the caller's own retry, with a new idempotency key: the identifier protects the count
    with pytest.raises(stripe.InvalidRequestError) as caught:
        await client.v1.billing.meter_events.create_async(
            event_params(customer, "6", identifier="job_8")
        )
    assert caught.value.code == "meter_event_duplicate_identifier"
    assert fake.totals() == {(customer, EVENT): 6}


async def test_faults_over_http_and_path_prefix(
    fake: FakeStripe, http: aiohttp.ClientSession, client: stripe.StripeClient
) -> None:
    async with http.post(
        f"{fake.url}/_fake/faults", json={"status": 500, "count": 2, "path_prefix": "/v1/cust"}
    ) as r:
        assert r.status == 200
        fault = await r.json()
    assert fault["count"] == 2 and fault["after_apply"] is False
    async with http.post(f"{fake.url}/_fake/faults", json={"status": "bad"}) as r:
        assert r.status == 400
        assert (await r.json())["error"]["param"] == "status"
    async with http.post(f"{fake.url}/_fake/faults", json={"count": 0}) as r:
        assert r.status == 400
    for _ in range(2):
        with pytest.raises(stripe.APIError):
            await client.v1.customers.create_async({"email": "a@example.com"})
    customer = await new_customer(client)
    assert customer.startswith("cus_")
    fake.inject(status=429, count=5)
    async with http.get(f"{fake.url}/_fake/faults") as r:
        assert [f["count"] for f in (await r.json())["data"]] == [5]
    async with http.delete(f"{fake.url}/_fake/faults") as r:
        assert r.status == 200
    await client.v1.billing.meter_events.create_async(event_params(customer))


# -- inspection ---------------------------------------------------------------------------


async def test_inspection_totals_equal_what_was_sent(
    fake: FakeStripe, client: stripe.StripeClient, http: aiohttp.ClientSession
) -> None:
    customers = [await new_customer(client, f"c{i}@example.com") for i in range(2)]
    sent: dict[tuple[str, str], int] = {}
    for i in range(12):
        customer, name = customers[i % 2], ("cpu_ms", "gpu_ms")[i % 3 == 0]
        value = i * 7 + 1
        await client.v1.billing.meter_events.create_async(
            {"event_name": name, "payload": {"stripe_customer_id": customer, "value": str(value)}}
        )
        sent[(customer, name)] = sent.get((customer, name), 0) + value
    assert fake.totals() == sent

    async with http.get(f"{fake.url}/_fake/summary") as r:
        rows = (await r.json())["data"]
    assert {(row["customer"], row["event_name"]): row["value"] for row in rows} == sent
    assert sum(row["count"] for row in rows) == 12
    async with http.get(
        f"{fake.url}/_fake/meter_events",
        params={"customer": customers[0], "event_name": "gpu_ms"},
    ) as r:
        events = (await r.json())["data"]
    assert sum(int(e["payload"]["value"]) for e in events) == sent[(customers[0], "gpu_ms")]
    assert all(e["object"] == "billing.meter_event" for e in events)
    async with http.get(f"{fake.url}/_fake/requests") as r:
        logged = (await r.json())["data"]
    assert len(logged) == 14 and all(entry["status"] == 200 for entry in logged)
    assert logged[-1]["method"] == "POST" and logged[-1]["path"] == "/v1/billing/meter_events"
    assert logged[-1]["params"]["payload"]["value"] == "78"
    assert logged[-1]["idempotency_key"]  # the SDK sends one on every POST

    async with http.post(f"{fake.url}/_fake/reset") as r:
        assert r.status == 200
    assert fake.totals() == {} and fake.requests == [] and fake.customers == []


# -- synchronous SDK and the command line -------------------------------------------------


@pytest.fixture
def threaded_fake() -> Iterator[tuple[FakeStripe, str]]:
    server = FakeStripe("sk_test_threaded")
    url = server.start_in_thread()
    yield server, url
    server.stop_thread()


def test_synchronous_sdk_against_a_threaded_fake(threaded_fake: tuple[FakeStripe, str]) -> None:
    server, url = threaded_fake
    client = stripe.StripeClient(
        "sk_test_threaded", base_addresses={"api": url, "meter_events": url}
    )
    customer = client.v1.customers.create({"email": "sync@example.com"})
    event = client.v1.billing.meter_events.create(
        event_params(customer.id, "12"), options={"idempotency_key": "sync-1"}
    )
    replay = client.v1.billing.meter_events.create(
        event_params(customer.id, "12"), options={"idempotency_key": "sync-1"}
    )
    assert replay.identifier == event.identifier
    assert server.totals() == {(customer.id, EVENT): 12}


def test_command_line_prints_url_and_key() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "billing.fake_stripe", "--port", "0", "--secret-key", "sk_test_cli"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        second = process.stdout.readline()
        assert first.startswith("fake Stripe listening on http://127.0.0.1:")
        assert second.strip() == "secret key: sk_test_cli"
        url = first.rsplit(" ", 1)[1].strip()
        client = stripe.StripeClient("sk_test_cli", base_addresses={"api": url})
        assert client.v1.customers.create({"name": "cli"}).name == "cli"
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
