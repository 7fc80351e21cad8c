"""Server-side control: what the operator's backend sees and does beside a call.

- `records`: each call's record (transcripts, barge-ins, tools, usage, audio counters)
  and the SQLite store that keeps them (and the webhook outbox) across restarts;
- `sideband`: `GET /v1/realtime?call_id=` — the operator's WebSocket onto a live call;
- `tools`: function tools the bridge runs itself (an operator config file);
- `webhooks`: each ended call's record POSTed, Standard-Webhooks-signed, retried;
- `recording`: opt-in stereo Ogg/Opus of each call.
"""
