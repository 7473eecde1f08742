"""Typed keys for what the gateway keeps on its app and requests."""

from __future__ import annotations

from aiohttp import web
from arq.connections import ArqRedis

from bulkhead.db import Database
from bulkhead.models import ApiKey
from gateway.jobs import JobService
from gateway.keycache import KeyCache
from gateway.sandboxes import SandboxService
from gateway.settings import GatewaySettings

SETTINGS = web.AppKey("settings", GatewaySettings)
DB = web.AppKey("db", Database)
REDIS = web.AppKey("redis", ArqRedis)
JOBS = web.AppKey("jobs", JobService)
KEY = web.RequestKey("api_key", ApiKey)
KEYS = web.AppKey("keys", KeyCache)
SANDBOXES = web.AppKey("sandboxes", SandboxService)
