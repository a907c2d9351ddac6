"""Server-wide options, as the web UI keeps them (GET / POST /sdapi/v1/options): `sd_model_checkpoint` (the
model a request that names none runs on) and any other key a client sends, kept and echoed as sent. Stored in
Redis (hash "{prefix}:options", one JSON value a key) when the service has one, so every API process answers
the same; in memory otherwise."""

from __future__ import annotations

import json

from .queue import QueueUnavailable

MAX_OPTIONS = 256          # keys kept (a client posting its whole options dict sends about 200)
MAX_VALUE_BYTES = 65536    # the JSON of one value


class Options:
    def __init__(self, settings):
        self.url, self.key = settings.redis_url, f"{settings.key_prefix}:options"
        self._memory: dict[str, str] = {}
        self._client = None

    def _redis(self):
        import redis.asyncio

        if self._client is None:
            self._client = redis.asyncio.Redis.from_url(self.url, socket_connect_timeout=2, socket_timeout=10)
        return self._client

    async def get(self) -> dict:
        if not self.url:
            raw = dict(self._memory)
        else:
            raw = await self._call(lambda r: r.hgetall(self.key))
            raw = {k.decode(): v.decode() for k, v in raw.items()}
        return {k: json.loads(v) for k, v in raw.items()}

    async def update(self, values: dict) -> None:
        """Store `values` (ValueError for too many keys or a value too big, naming it)."""
        encoded = {}
        for k, v in values.items():
            text = json.dumps(v)
            if len(text) > MAX_VALUE_BYTES:
                raise ValueError(f"options: {k!r} is {len(text)} bytes of JSON, the limit is {MAX_VALUE_BYTES}")
            encoded[str(k)] = text
        known = set(await self.get())
        if len(known | set(encoded)) > MAX_OPTIONS:
            raise ValueError(f"options: at most {MAX_OPTIONS} keys are kept")
        if not encoded:
            return
        if not self.url:
            self._memory.update(encoded)
        else:
            await self._call(lambda r: r.hset(self.key, mapping=encoded))

    async def _call(self, fn):
        import redis

        try:
            return await fn(self._redis())
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            raise QueueUnavailable(f"Redis is unreachable: {e}") from e

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
