"""Configuration: command-line flags, environment variables and an optional `.env`
file (flags win, then the environment, then `.env`), validated once into one
frozen `Settings` object. Every option is declared once in `OPTIONS`; `--help`,
the env lookup and the README table all come from that list.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from dotenv import dotenv_values

OPENAI_REALTIME_URL = "wss://api.openai.com/v1/realtime"

DEFAULT_CLIENT_EVENTS = (
    "session.update",
    "response.create",
    "response.cancel",
    "conversation.item.create",
    "conversation.item.delete",
    "conversation.item.retrieve",
    "input_audio_buffer.clear",
    "output_audio_buffer.clear",
)
# Dotted paths inside `session` a page may change. Audio formats and the model
# are never on this list: the bridge depends on 24 kHz PCM both ways.
DEFAULT_SESSION_FIELDS = (
    "type",
    "instructions",
    "output_modalities",
    "audio.input.turn_detection",
    "audio.input.transcription",
    "audio.input.noise_reduction",
    "audio.output.voice",
    "audio.output.speed",
    "tools",
    "tool_choice",
    "max_output_tokens",
)

#: What the operator's sideband may send (everything but the caller's own audio). Its
#: session.update may change every field but the audio formats and the model.
DEFAULT_SIDEBAND_EVENTS = DEFAULT_CLIENT_EVENTS + ("input_audio_buffer.commit",)
SIDEBAND_SESSION_FIELDS = DEFAULT_SESSION_FIELDS + ("tracing", "truncation", "prompt", "include")


class ConfigError(Exception):
    """A setting is missing or invalid; the message is one line for the operator."""


@dataclass(frozen=True)
class IceServer:
    urls: str
    username: Optional[str] = None
    credential: Optional[str] = None


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    realtime_url: Optional[str] = None
    api_key: Optional[str] = field(default=None, repr=False)
    auth_style: str = "auto"
    model: str = "gpt-realtime"
    voice: str = "alloy"
    instructions: str = "You are a helpful, concise voice assistant."
    turn_detection: str = "auto"
    vad_threshold: float = 0.55
    vad_prefix_padding_ms: int = 300
    vad_silence_ms: int = 500
    vad_eagerness: str = "auto"
    transcription_model: str = "whisper-1"
    ice_servers: tuple[IceServer, ...] = ()
    max_calls: int = 20
    max_call_seconds: float = 3600.0
    connect_timeout: float = 15.0
    media_timeout: float = 10.0
    reconnect_grace: float = 20.0
    upstream_session_lifetime: float = -1.0  # auto
    admission: bool = True
    max_connections: int = 1000
    offers_per_minute: int = 60
    pending_offers_per_address: int = 10
    audio_path: str = "libopus"
    reorder_wait_ms: int = 40
    echo_guard: str = "auto"
    red: bool = True
    opus_bitrate: int = 32000
    opus_dtx: str = "auto"
    browser_opus_bitrate: int = 48000
    auth_token: Optional[str] = field(default=None, repr=False)
    cors_origins: tuple[str, ...] = ()
    client_events: tuple[str, ...] = DEFAULT_CLIENT_EVENTS
    session_fields: tuple[str, ...] = DEFAULT_SESSION_FIELDS
    redis_url: Optional[str] = field(default=None, repr=False)
    node_url: Optional[str] = None
    node_id: Optional[str] = None
    cluster_secret: Optional[str] = field(default=None, repr=False)
    drain_seconds: float = 0.0
    turn_host: Optional[str] = None
    turn_urls: tuple[str, ...] = ()
    turn_secret: Optional[str] = field(default=None, repr=False)
    turn_ttl: int = 3600
    rtc_port_range: Optional[tuple[int, int]] = None
    public_ip: tuple[str, ...] = ()
    rtc_interfaces: tuple[str, ...] = ()
    records_db: str = field(default="data/records.db", repr=False)  # a database URL can hold a password
    records_keep_days: float = 0.0
    record_audio: Optional[str] = None
    tools_config: Optional[str] = None
    tools: Any = field(default=None, repr=False)  # control.tools.ToolSet, read from tools_config
    webhook_url: Optional[str] = field(default=None, repr=False)
    webhook_secret: Optional[str] = field(default=None, repr=False)
    operator_on_loopback: bool = False
    sideband_client_events: tuple[str, ...] = DEFAULT_SIDEBAND_EVENTS
    local_responder: str = "echo"
    local_llm_model: str = "llama3.2"
    local_stt_model: str = ""
    local_tts_voice: str = ""
    log_level: str = "INFO"

    # -- derived -----------------------------------------------------------

    @property
    def uses_local_backend(self) -> bool:
        return self.realtime_url is None and self.api_key is None

    def upstream_url(self, local_url: Optional[str] = None) -> str:
        """The WebSocket URL of the Realtime server, with the model in the query."""
        base = self.realtime_url or (local_url if self.uses_local_backend else OPENAI_REALTIME_URL)
        assert base, "local backend URL required"
        parts = urlsplit(base)
        query = parse_qs(parts.query)
        if "model" not in query and "deployment" not in query:
            query["model"] = [self.model]
        return urlunsplit(parts._replace(query=urlencode(query, doseq=True)))

    def upstream_lifetime(self) -> float:
        """Seconds an upstream session is used before a planned handoff (0: no limit)."""
        if self.upstream_session_lifetime >= 0:
            return self.upstream_session_lifetime
        if self.uses_local_backend:
            return 0.0
        host = urlsplit(self.realtime_url or OPENAI_REALTIME_URL).hostname or ""
        return 3300.0 if host == "api.openai.com" or host.endswith((".azure.com", ".azure.us", ".azure.cn")) else 0.0

    def ice_policy(self):
        from media.ice import IcePolicy

        return IcePolicy(self.rtc_port_range, self.public_ip, self.rtc_interfaces)

    def secrets(self) -> list[Optional[str]]:
        """Everything that must never reach a page, a log line or an error message."""
        extra = self.tools.secrets() if self.tools else []
        db_password = urlsplit(self.records_db).password if "://" in self.records_db else None
        return [self.api_key, self.auth_token, self.webhook_url, self.webhook_secret, self.turn_secret,
                self.cluster_secret, self.redis_url, db_password, *extra]

    def upstream_headers(self) -> dict[str, str]:
        """Auth header for the upstream; the key never goes anywhere else."""
        if not self.api_key:
            return {}
        style = self.auth_style
        if style == "auto":
            host = urlsplit(self.realtime_url or OPENAI_REALTIME_URL).hostname or ""
            style = "api-key" if host.endswith((".azure.com", ".azure.us", ".azure.cn")) else "bearer"
        if style == "api-key":
            return {"api-key": self.api_key}
        return {"Authorization": f"Bearer {self.api_key}"}

    @property
    def effective_turn_detection(self) -> str:
        """'auto': semantic VAD with the embedded local backend (its end of turn reads the
        transcript: a finished sentence is answered after 200 ms of silence instead of 500;
        BENCHMARKS.md §11), server VAD with any other upstream (as before)."""
        if self.turn_detection == "auto":
            return "semantic_vad" if self.uses_local_backend else "server_vad"
        return self.turn_detection

    def turn_detection_config(self) -> Optional[dict[str, Any]]:
        mode = self.effective_turn_detection
        if mode == "none":
            return None
        if mode == "semantic_vad":
            return {"type": "semantic_vad", "eagerness": self.vad_eagerness,
                    "create_response": True, "interrupt_response": True}
        return {
            "type": "server_vad",
            "threshold": self.vad_threshold,
            "prefix_padding_ms": self.vad_prefix_padding_ms,
            "silence_duration_ms": self.vad_silence_ms,
            "create_response": True,
            "interrupt_response": True,
        }

    def session_config(self) -> dict[str, Any]:
        """The GA `session` object the bridge sends upstream on connect."""
        audio_in: dict[str, Any] = {
            "format": {"type": "audio/pcm", "rate": 24000},
            "turn_detection": self.turn_detection_config(),
        }
        if self.transcription_model != "none":
            audio_in["transcription"] = {"model": self.transcription_model}
        session: dict[str, Any] = {
            "type": "realtime",
            "model": self.model,
            "instructions": self.instructions,
            "output_modalities": ["audio"],
            "audio": {
                "input": audio_in,
                "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": self.voice},
            },
        }
        if self.tools:
            session["tools"] = self.tools.definitions()
        return session

    def ice_config(self) -> list[dict[str, Any]]:
        """ICE servers in the browser's RTCIceServer shape (for the page), with freshly
        minted TURN credentials when a TURN REST secret is set."""
        out = []
        if self.turn_secret:
            from signaling.turn import credentials, default_urls

            urls = self.turn_urls or default_urls(self.turn_host or "")
            out.append(credentials(self.turn_secret, self.turn_ttl, urls))
        for s in self.ice_servers:
            entry: dict[str, Any] = {"urls": s.urls}
            if s.username:
                entry["username"] = s.username
                entry["credential"] = s.credential or ""
            out.append(entry)
        return out


# -- parsing -------------------------------------------------------------------


def _positive_int(v: str) -> int:
    n = int(v)
    if n <= 0:
        raise ValueError("must be a positive integer")
    return n


def _port(v: str) -> int:
    n = int(v)
    if not 0 <= n <= 65535:
        raise ValueError("must be between 0 and 65535")
    return n


def _positive_float(v: str) -> float:
    n = float(v)
    if not n > 0:
        raise ValueError("must be a positive number")
    return n


def _non_negative_float(v: str) -> float:
    n = float(v)
    if not n >= 0:
        raise ValueError("must be zero or more")
    return n


def _lifetime(v: str) -> float:
    if v.strip().lower() == "auto":
        return -1.0
    return _non_negative_float(v)


def _unit_float(v: str) -> float:
    n = float(v)
    if not 0.0 <= n <= 1.0:
        raise ValueError("must be between 0 and 1")
    return n


def _non_negative_int(v: str) -> int:
    n = int(v)
    if n < 0:
        raise ValueError("must be zero or more")
    return n


def _bool(v: str) -> bool:
    low = v.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _dtx(v: str) -> str:
    low = v.strip().lower()
    if low == "auto":
        return "auto"
    try:
        return "on" if _bool(low) else "off"
    except ValueError:
        raise ValueError("must be auto, on or off") from None


def _bitrate(v: str) -> int:
    n = int(v)
    if not 6000 <= n <= 128000:
        raise ValueError("must be between 6000 and 128000")
    return n


def _browser_bitrate(v: str) -> int:
    n = int(v)
    if n and not 6000 <= n <= 510000:
        raise ValueError("must be 0 (browser default) or between 6000 and 510000")
    return n


def _port_range(v: str) -> tuple[int, int]:
    from media.ice import parse_port_range

    return parse_port_range(v)


def _addresses(v: str) -> tuple[str, ...]:
    import ipaddress

    out = _csv(v)
    for a in out:
        try:
            ipaddress.ip_address(a)
        except ValueError:
            raise ValueError(f"{a!r} is not an IP address") from None
    return out


def _interfaces(v: str) -> tuple[str, ...]:
    from media.ice import check_interfaces

    out = _csv(v)
    check_interfaces(out)
    return out


def _records_db(v: str) -> str:
    from control.records import StoreError, open_store

    if v.lower() != "none":
        try:
            open_store(v)
        except StoreError as exc:
            raise ValueError(str(exc)) from None
    return v


def _redis_url(v: str) -> str:
    if urlsplit(v).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    return v


def _http_url(v: str) -> str:
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    return v


def _csv(v: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in v.split(",") if x.strip())


def _ws_url(v: str) -> str:
    parts = urlsplit(v)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError("must be a ws:// or wss:// URL with a host")
    return v


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(v: str) -> str:
        v = v.strip()
        if v not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return v

    return parse


@dataclass(frozen=True)
class Option:
    name: str  # Settings field
    env: tuple[str, ...]
    parse: Callable[[str], Any]
    help: str
    secret: bool = False
    shown: Optional[str] = None  # how the default is shown, when its stored value says it badly


OPTIONS: tuple[Option, ...] = (
    Option("host", ("HOST",), str, "address to listen on (0.0.0.0 for other machines; phones need --tls-cert)"),
    Option("port", ("PORT",), _port, "TCP port for the page, signaling and the local backend"),
    Option("workers", ("WORKERS",), _positive_int, "server processes sharing the port (one event loop each; use one per core); MAX_CALLS is a total over all of them"),
    Option("tls_cert", ("TLS_CERT",), str, "PEM certificate: serve HTTPS (browsers only allow the mic on https or localhost)"),
    Option("tls_key", ("TLS_KEY",), str, "PEM private key for --tls-cert"),
    Option("realtime_url", ("REALTIME_URL",), _ws_url, "upstream Realtime WebSocket URL (default: OpenAI if a key is set, else the embedded local backend)"),
    Option("api_key", ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "REALTIME_API_KEY"), str, "upstream API key (sent only to the upstream, in the header its service expects)", secret=True),
    Option("auth_style", ("REALTIME_AUTH_STYLE",), _choice("auto", "bearer", "api-key"), "how the key is sent: 'Authorization: Bearer' or Azure's 'api-key' header (auto: api-key for *.azure.com hosts)"),
    Option("model", ("REALTIME_MODEL",), str, "model (or Azure deployment) asked of the upstream"),
    Option("voice", ("REALTIME_VOICE",), str, "voice of the model"),
    Option("instructions", ("REALTIME_INSTRUCTIONS",), str, "system instructions sent in session.update"),
    Option("turn_detection", ("TURN_DETECTION",), _choice("auto", "server_vad", "semantic_vad", "none"), "turn detection mode ('auto': semantic_vad with the embedded local backend, which answers a finished sentence sooner, server_vad with any other upstream; 'none': the page commits and asks for responses)"),
    Option("vad_threshold", ("VAD_THRESHOLD",), _unit_float, "server VAD activation threshold, 0..1"),
    Option("vad_prefix_padding_ms", ("VAD_PREFIX_PADDING_MS",), _non_negative_int, "audio kept before detected speech, ms"),
    Option("vad_silence_ms", ("VAD_SILENCE_MS",), _positive_int, "silence that ends a turn, ms"),
    Option("vad_eagerness", ("VAD_EAGERNESS",), _choice("low", "medium", "high", "auto"), "semantic VAD eagerness"),
    Option("transcription_model", ("TRANSCRIPTION_MODEL",), str, "input transcription model for the user's captions ('none' turns captions of the user off)"),
    Option("ice_servers", ("ICE_SERVERS",), str, "comma-separated STUN/TURN URLs (default none: nothing waits on unreachable STUN)"),
    Option("ice_username", ("ICE_USERNAME",), str, "username for the TURN servers"),
    Option("ice_credential", ("ICE_CREDENTIAL",), str, "credential for the TURN servers", secret=True),
    Option("redis_url", ("REDIS_URL",), _redis_url, "join a cluster of nodes coordinated through this Redis (redis://host:6379/0): offers go to the least-loaded node, per-call requests to the node holding the call, MAX_CALLS counts the whole cluster (unset: this machine alone)", secret=True),
    Option("node_url", ("NODE_URL",), _http_url, "the URL other nodes reach this one at, http://ADDRESS:PORT (default: from --host and --port, which then must not be 0.0.0.0)"),
    Option("node_id", ("NODE_ID",), str, "this node's name in the cluster (default: hostname-port)"),
    Option("cluster_secret", ("CLUSTER_SECRET",), str, "secret shared by the cluster's nodes: offers they place on each other carry an HMAC of it", secret=True),
    Option("drain_seconds", ("DRAIN_SECONDS",), _non_negative_float, "on SIGTERM, take no new calls (a cluster places them elsewhere) and let live calls go on for up to this long before ending them"),
    Option("turn_host", ("TURN_HOST",), str, "a coturn server (TURN REST secret): pages are given short-lived credentials for TURN over UDP and TCP on 3478 and TLS on 443 of this host"),
    Option("turn_urls", ("TURN_URLS",), _csv, "the TURN URLs pages are given instead of TURN_HOST's three (turn:/turns:, comma-separated)"),
    Option("turn_secret", ("TURN_SECRET",), str, "the secret shared with coturn (its static-auth-secret, with use-auth-secret)", secret=True),
    Option("turn_ttl", ("TURN_TTL",), _positive_int, "seconds the TURN credentials of a page are valid"),
    Option("rtc_port_range", ("RTC_PORT_RANGE",), _port_range, "UDP ports the server's ICE candidates use, LOW-HIGH (one per call and address; for firewall rules and Kubernetes hostPorts; default: any)"),
    Option("public_ip", ("PUBLIC_IP",), _addresses, "address(es) of a 1:1 NAT in front of this server (a cloud VM's public IP), advertised with each candidate's port"),
    Option("rtc_interfaces", ("RTC_INTERFACES",), _interfaces, "interfaces to gather ICE candidates on: names, addresses or networks, comma-separated (default: all but loopback)"),
    Option("max_calls", ("MAX_CALLS",), _positive_int, "concurrent calls before new ones get 503"),
    Option("max_call_seconds", ("MAX_CALL_SECONDS",), _positive_float, "a call is ended after this long"),
    Option("connect_timeout", ("CONNECT_TIMEOUT",), _positive_float, "seconds for ICE+DTLS to connect before the call is dropped"),
    Option("media_timeout", ("MEDIA_TIMEOUT",), _positive_float, "seconds without audio from the caller before the call is ended"),
    Option("admission", ("ADMISSION",), _bool, "refuse new calls (503 + Retry-After, /readyz not ready) while this process's event-loop lag, outbound frame lateness or CPU says admitted calls would suffer, not only at MAX_CALLS"),
    Option("max_connections", ("MAX_CONNECTIONS",), _positive_int, "open HTTP connections per process; past it the one idle the longest is closed (kept below the file-descriptor limit)"),
    Option("offers_per_minute", ("OFFERS_PER_MINUTE",), _non_negative_int, "offers one client address may make per minute (a burst of that many, then one every 60/N s; 0: no limit; requests with BRIDGE_AUTH_TOKEN are exempt)"),
    Option("pending_offers_per_address", ("PENDING_OFFERS_PER_ADDRESS",), _non_negative_int, "calls one client address may have not yet connected (ICE/DTLS) at once (0: no limit; BRIDGE_AUTH_TOKEN exempt)"),
    Option("reconnect_grace", ("RECONNECT_GRACE",), _non_negative_float, "seconds a call whose caller's network went away (no audio for 2 s, or ICE failed) is held for the caller to re-attach with POST /v1/realtime/calls/{id}/reconnect (0: no holding; the call ends after MEDIA_TIMEOUT)"),
    Option("upstream_session_lifetime", ("UPSTREAM_SESSION_LIFETIME",), _lifetime, "seconds after which a call moves to a new upstream session between turns, with the conversation replayed as text ('auto': 3300 for OpenAI and Azure, whose sessions end at 60 minutes, none for other servers; 0: never). A session closed with 1001/1006/1011/1012/1013 is replaced the same way at any time", shown="auto"),
    Option("audio_path", ("AUDIO_PATH",), _choice("libopus", "aiortc"), "Opus both ways: 'libopus' is the bridge's own (answer asks for in-band FEC and RED; lost packets rebuilt from RED, then FEC, then concealment; 24 kHz mono encoder with FEC sized from the browser's loss reports); 'aiortc' is aiortc's stock path (its jitter buffer, PyAV decode + resample, 96 kb/s CELT encoder, no FEC, lost audio becomes silence)"),
    Option("reorder_wait_ms", ("REORDER_WAIT_MS",), _non_negative_int, "longest wait for a missing packet before it is given up and rebuilt, ms (rounded down to 20 ms packets; no wait when the next packet carries the lost audio)"),
    Option("echo_guard", ("ECHO_GUARD",), _choice("auto", "on", "off"), "server-side echo cancellation of the caller's audio against what the bridge played (WebRTC AEC3), for phones whose own canceller fails: 'auto' cancels while the model speaks until a call shows it has no echo (then its audio passes untouched), 'on' always while the model speaks, 'off' never"),
    Option("red", ("AUDIO_RED",), _bool, "negotiate redundant audio (RED, RFC 2198) with browsers that offer it: each packet also carries the previous frame (about twice the audio bitrate), so a lost packet is rebuilt exactly"),
    Option("opus_bitrate", ("OPUS_BITRATE",), _bitrate, "bitrate of the audio sent to the browser, bits/s (6000-128000; 24 kHz mono speech, in-band FEC on top)"),
    Option("browser_opus_bitrate", ("BROWSER_OPUS_BITRATE",), _browser_bitrate, "bitrate asked of the browser's Opus encoder, bits/s (answer's maxaveragebitrate; 0: the browser's default, 32000 in Chrome). In-band FEC comes out of this budget once loss is reported: at 32000 Chrome's speech lost 0.5 PESQ at 10 % loss, at 48000 0.3 (BENCHMARKS.md §7); RED doubles what is sent"),
    Option("opus_dtx", ("OPUS_DTX",), _dtx, "discontinuous transmission toward the browser: while the model is silent, one packet every 420 ms instead of every 20 ms. 'auto' until the model first speaks on each peer (Firefox holds every silent frame of a call's first seconds and then plays its first answer ≈1 s late), 'on' always, 'off' never"),
    Option("auth_token", ("BRIDGE_AUTH_TOKEN",), str, "if set, creating a call needs 'Authorization: Bearer' with this token or an ephemeral key from POST /v1/realtime/client_secrets (default: open)", secret=True),
    Option("cors_origins", ("CORS_ORIGINS",), _csv, "comma-separated origins allowed to call the API from other sites ('*' for any; default: same origin only)"),
    Option("client_events", ("ALLOWED_CLIENT_EVENTS",), _csv, "client event types the page may send upstream"),
    Option("session_fields", ("ALLOWED_SESSION_FIELDS",), _csv, "dotted session fields a page's session.update may change"),
    Option("records_db", ("RECORDS_DB",), _records_db, "where call records and the webhook outbox are kept (GET /v1/realtime/calls/{id}): an SQLite file, or a postgresql:// URL for several nodes sharing one database; 'none' keeps no records", secret=True, shown="data/records.db"),
    Option("records_keep_days", ("RECORDS_KEEP_DAYS",), _non_negative_float, "ended calls' records older than this many days are removed (at start and hourly; 0: kept for ever)"),
    Option("record_audio", ("RECORD_AUDIO",), str, "folder for each call's audio as one stereo Ogg/Opus file (caller left, model right as heard, aligned in time); unset: no recording"),
    Option("tools_config", ("TOOLS_CONFIG",), str, "TOML or YAML file of function tools the bridge runs itself (HTTP endpoints, headers with secrets, timeouts); checked at start"),
    Option("webhook_url", ("WEBHOOK_URL",), _http_url, "after each call, POST its record here (Standard Webhooks signature; retried with backoff, kept across restarts)", secret=True),
    Option("webhook_secret", ("WEBHOOK_SECRET",), str, "the webhook signing secret, whsec_<base64> (Standard Webhooks)", secret=True),
    Option("operator_on_loopback", ("OPERATOR_ON_LOOPBACK",), _bool, "with no BRIDGE_AUTH_TOKEN, let loopback clients use the operator routes (sideband, call records); never behind a proxy on the same host"),
    Option("sideband_client_events", ("SIDEBAND_CLIENT_EVENTS",), _csv, "client event types an operator's sideband connection may send"),
    Option("local_responder", ("LOCAL_RESPONDER",), str, "local backend's responder: 'echo' or an OpenAI-compatible chat-completions base URL (e.g. http://127.0.0.1:11434/v1)"),
    Option("local_llm_model", ("LOCAL_LLM_MODEL",), str, "model name sent to that chat-completions server"),
    Option("local_stt_model", ("LOCAL_STT_MODEL",), str, "local backend's speech recogniser: a faster-whisper model directory (or a model name in faster-whisper's cache; default: the bundled Whisper tiny.en), or 'pocketsphinx'"),
    Option("local_tts_voice", ("LOCAL_TTS_VOICE",), str, "local backend's voices: Piper .onnx files (with their .onnx.json) or folders of them, comma-separated, the first the default (default: the bundled en_US-joe-medium; espeak-ng if none loads)"),
    Option("log_level", ("LOG_LEVEL",), _choice("DEBUG", "INFO", "WARNING", "ERROR"), "log level"),
)

_DEFAULTS = Settings()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="server.py",
        description="WebRTC bridge between browsers and OpenAI-Realtime-protocol speech models. "
        "Each flag can also be set by the environment variable shown, or in a .env file; flags win.",
    )
    parser.add_argument("--env-file", default=".env", help="optional dotenv file (default: .env)")
    for opt in OPTIONS:
        default = getattr(_DEFAULTS, opt.name, None) if hasattr(_DEFAULTS, opt.name) else None
        shown = "" if (opt.secret and not opt.shown) or default in (None, "", ()) else f" (default: {opt.shown or _show(default)})"
        parser.add_argument(
            "--" + opt.name.replace("_", "-"),
            dest=opt.name,
            default=None,
            metavar=opt.env[0],
            help=f"{opt.help}{shown} [env {' or '.join(opt.env)}]".replace("%", "%%"),  # argparse formats help
        )
    return parser


def markdown_table() -> str:
    """The README's configuration table, made from OPTIONS (a test keeps README in step)."""
    rows = ["| flag | environment | default | what it does |", "|---|---|---|---|"]
    for opt in OPTIONS:
        default = getattr(_DEFAULTS, opt.name, None)
        shown = "—" if (opt.secret and not opt.shown) or default in (None, "", ()) else f"`{opt.shown or _show(default)}`"
        rows.append(f"| `--{opt.name.replace('_', '-')}` | {' / '.join(f'`{e}`' for e in opt.env)} | {shown} | "
                    f"{opt.help.replace('|', '/')} |")
    return "\n".join(rows)


def _show(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def load(argv: Optional[Sequence[str]] = None, environ: Optional[dict[str, str]] = None) -> Settings:
    """Resolve every option (flag > environment > .env > default) and validate."""
    args = build_parser().parse_args(argv)
    env = dict(os.environ if environ is None else environ)
    dotenv = {k: v for k, v in dotenv_values(args.env_file).items() if v is not None} if os.path.isfile(args.env_file) else {}
    raw: dict[str, str] = {}
    for opt in OPTIONS:
        value = getattr(args, opt.name)
        if value is None:
            value = next((env[e] for e in opt.env if env.get(e)), None)
        if value is None:
            value = next((dotenv[e] for e in opt.env if dotenv.get(e)), None)
        if value is not None:
            raw[opt.name] = value
    return from_raw(raw)


def from_raw(raw: dict[str, str]) -> Settings:
    values: dict[str, Any] = {}
    by_name = {o.name: o for o in OPTIONS}
    for name, text in raw.items():
        opt = by_name[name]
        try:
            values[name] = opt.parse(text)
        except ValueError as exc:
            shown = "<hidden>" if opt.secret else repr(text)
            reason = str(exc) if "invalid literal" not in str(exc) and "could not convert" not in str(exc) else "not a number"
            raise ConfigError(f"--{name.replace('_', '-')} ({opt.env[0]}) = {shown}: {reason}") from None
    ice_urls = _csv(values.pop("ice_servers", ""))
    user, cred = values.pop("ice_username", None), values.pop("ice_credential", None)
    for url in ice_urls:
        if not url.startswith(("stun:", "stuns:", "turn:", "turns:")):
            raise ConfigError(f"--ice-servers (ICE_SERVERS): {url!r} is not a stun:/turn: URL")
        if url.startswith("turn") and not (user and cred):
            raise ConfigError("--ice-servers (ICE_SERVERS): TURN servers need ICE_USERNAME and ICE_CREDENTIAL")
    values["ice_servers"] = tuple(
        IceServer(u, user if u.startswith("turn") else None, cred if u.startswith("turn") else None) for u in ice_urls
    )
    if values.get("tools_config"):
        from control.tools import ToolsError, load_tools

        try:
            values["tools"] = load_tools(values["tools_config"])
        except ToolsError as exc:
            raise ConfigError(f"--tools-config (TOOLS_CONFIG): {exc}") from None
    secret = values.get("webhook_secret")
    if values.get("webhook_url") and not secret:
        raise ConfigError("--webhook-url (WEBHOOK_URL) needs WEBHOOK_SECRET (whsec_<base64>) to sign deliveries")
    if secret:
        from control.webhooks import SecretError, signing_key

        try:
            signing_key(secret)
        except SecretError as exc:
            raise ConfigError(f"--webhook-secret (WEBHOOK_SECRET): {exc}") from None
    if values.get("redis_url"):
        if not values.get("cluster_secret"):
            raise ConfigError("--redis-url (REDIS_URL) needs CLUSTER_SECRET, shared by every node")
        if values.get("workers", 1) > 1:
            raise ConfigError("--redis-url (REDIS_URL) and --workers go apart: in a cluster, run one node per core")
        if not values.get("node_url"):
            host = values.get("host", "127.0.0.1")
            if host in ("0.0.0.0", "::", ""):
                raise ConfigError("--redis-url (REDIS_URL) with --host 0.0.0.0 needs NODE_URL: the address other "
                                  "nodes reach this one at")
            scheme = "https" if values.get("tls_cert") else "http"
            values["node_url"] = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{values.get('port', 8080)}"
        if not values.get("node_id"):
            import socket

            values["node_id"] = f"{socket.gethostname()}-{values.get('port', 8080)}"
    turn_urls = values.get("turn_urls", ())
    for url in turn_urls:
        if not url.startswith(("turn:", "turns:")):
            raise ConfigError(f"--turn-urls (TURN_URLS): {url!r} is not a turn:/turns: URL")
    if (values.get("turn_host") or turn_urls) and not values.get("turn_secret"):
        raise ConfigError("--turn-host/--turn-urls need TURN_SECRET (coturn's static-auth-secret)")
    if values.get("turn_secret") and not (values.get("turn_host") or turn_urls):
        raise ConfigError("TURN_SECRET is set but neither TURN_HOST nor TURN_URLS says where the TURN server is")
    if bool(values.get("tls_cert")) != bool(values.get("tls_key")):
        raise ConfigError("--tls-cert and --tls-key go together")
    if values.get("realtime_url", "").startswith("wss://api.openai.com") and not values.get("api_key"):
        raise ConfigError("REALTIME_URL points at OpenAI but OPENAI_API_KEY is not set")
    return Settings(**values)


def load_or_exit(argv: Optional[Sequence[str]] = None) -> Settings:
    try:
        return load(argv)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
