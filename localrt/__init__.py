"""The embedded local Realtime backend: a GA-protocol WebSocket server whose model is
VAD (silero) → speech-to-text (pocketsphinx) → responder (echo or a chat-completions
server) → text-to-speech (espeak-ng). Runs offline; `python -m localrt --help`."""
