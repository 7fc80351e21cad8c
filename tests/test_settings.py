"""Unit: settings from flags, environment and .env; the upstream choice; config errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import settings as config

ROOT = Path(__file__).resolve().parent.parent


def load(argv=(), env=None, tmp_path=None):
    env_file = str(tmp_path / "none.env") if tmp_path else "/nonexistent.env"
    return config.load(["--env-file", env_file, *argv], environ=env or {})


def test_defaults_are_semantic_vad_locally_server_vad_055_300ms_500ms_upstream_with_transcription_and_no_ice_servers():
    s = load()
    td = s.session_config()["audio"]["input"]["turn_detection"]
    assert td == {"type": "semantic_vad", "eagerness": "auto", "create_response": True, "interrupt_response": True}
    remote = config.load([], environ={"OPENAI_API_KEY": "sk-test"})
    td = remote.session_config()["audio"]["input"]["turn_detection"]
    assert td == {"type": "server_vad", "threshold": 0.55, "prefix_padding_ms": 300, "silence_duration_ms": 500,
                  "create_response": True, "interrupt_response": True}
    forced = config.load(["--turn-detection", "server_vad"], environ={})
    assert forced.session_config()["audio"]["input"]["turn_detection"]["type"] == "server_vad"
    assert s.session_config()["audio"]["input"]["transcription"] == {"model": "whisper-1"}
    assert s.session_config()["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert s.ice_servers == () and s.uses_local_backend


def test_flags_win_over_environment_which_wins_over_dotenv(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("PORT=7000\nREALTIME_VOICE=ash\nREALTIME_MODEL=from-dotenv\n")
    s = config.load(["--env-file", str(env_file), "--port", "9000"], environ={"PORT": "8000", "REALTIME_VOICE": "verse"})
    assert (s.port, s.voice, s.model) == (9000, "verse", "from-dotenv")


def test_a_key_alone_means_openai_ga_with_a_bearer_header():
    s = load(env={"OPENAI_API_KEY": "sk-test"})
    assert s.upstream_url() == "wss://api.openai.com/v1/realtime?model=gpt-realtime"
    assert s.upstream_headers() == {"Authorization": "Bearer sk-test"}
    assert not s.uses_local_backend


def test_azure_urls_get_the_api_key_header_and_keep_their_deployment():
    s = load(env={"REALTIME_URL": "wss://res.openai.azure.com/openai/realtime?api-version=2025-04-01-preview&deployment=rt",
                  "AZURE_OPENAI_API_KEY": "az-key"})
    assert s.upstream_headers() == {"api-key": "az-key"}
    assert "deployment=rt" in s.upstream_url() and "model=" not in s.upstream_url()


def test_another_server_gets_bearer_and_the_model_in_the_query():
    s = load(env={"REALTIME_URL": "ws://127.0.0.1:9/v1/realtime", "OPENAI_API_KEY": "k"})
    assert s.upstream_url() == "ws://127.0.0.1:9/v1/realtime?model=gpt-realtime"
    assert s.upstream_headers() == {"Authorization": "Bearer k"}
    assert load(env={"REALTIME_URL": "ws://h/x", "OPENAI_API_KEY": "k", "REALTIME_AUTH_STYLE": "api-key"}).upstream_headers() == {"api-key": "k"}


def test_the_key_never_appears_in_the_repr():
    assert "sk-secret" not in repr(load(env={"OPENAI_API_KEY": "sk-secret"}))


@pytest.mark.parametrize("argv, fragment", [
    (["--port", "abc"], "--port (PORT) = 'abc': not a number"),
    (["--port", "70000"], "between 0 and 65535"),
    (["--realtime-url", "http://example.com"], "ws:// or wss://"),
    (["--vad-threshold", "1.5"], "between 0 and 1"),
    (["--turn-detection", "sometimes"], "must be one of auto, server_vad, semantic_vad, none"),
    (["--ice-servers", "turn:turn.example.com:3478"], "need ICE_USERNAME and ICE_CREDENTIAL"),
    (["--realtime-url", "wss://api.openai.com/v1/realtime"], "OPENAI_API_KEY is not set"),
])
def test_config_errors_name_the_setting(argv, fragment):
    with pytest.raises(config.ConfigError, match=None) as exc:
        load(argv)
    assert fragment in str(exc.value)


def test_ice_servers_with_turn_credentials_reach_the_page_config():
    s = load(["--ice-servers", "stun:stun.example.com:3478,turn:turn.example.com:3478?transport=tcp"],
             env={"ICE_USERNAME": "u", "ICE_CREDENTIAL": "p"})
    assert s.ice_config() == [{"urls": "stun:stun.example.com:3478"},
                              {"urls": "turn:turn.example.com:3478?transport=tcp", "username": "u", "credential": "p"}]


def test_a_config_error_stops_start_up_with_one_line_and_no_traceback():
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "REALTIME_URL")}
    proc = subprocess.run([sys.executable, "server.py", "--port", "abc"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["config error: --port (PORT) = 'abc': not a number"]


def test_help_explains_every_option():
    proc = subprocess.run([sys.executable, "server.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    for opt in config.OPTIONS:
        assert "--" + opt.name.replace("_", "-") in proc.stdout
        assert opt.env[0] in proc.stdout


def test_the_readme_configuration_table_is_the_option_list():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- options:start -->\n", 1)[1].split("\n<!-- options:end -->", 1)[0]
    assert block == config.markdown_table()  # regenerate with: python -c "import settings; print(settings.markdown_table())"
