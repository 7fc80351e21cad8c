"""`python -m localrt --port 8765`: the local Realtime backend on its own, for any Realtime client
(ws://HOST:PORT/v1/realtime). Takes the same settings as server.py (voice, instructions,
LOCAL_RESPONDER, LOCAL_LLM_MODEL, ...)."""

from __future__ import annotations

import logging
import sys

from aiohttp import web

import settings as config
from realtime import redaction

from .server import build_local_app


def main() -> None:
    argv = sys.argv[1:]
    if not any(a.startswith("--port") for a in argv):
        argv = ["--port", "8765", *argv]
    settings = config.load_or_exit(argv)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redaction.configure(settings.api_key, settings.auth_token)
    app = build_local_app(settings)
    print(f"local Realtime backend: ws://{settings.host}:{settings.port}/v1/realtime", file=sys.stderr)
    web.run_app(app, host=settings.host, port=settings.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
