"""The offline loop as a user meets it: an aiortc caller speaks ten varied sentences (Piper's
voice) through the real bridge to the embedded local backend; its captions must be right
and its spoken replies recognisable."""

from __future__ import annotations

import asyncio

from aiohttp import web

import settings as config
from harness.speech import read_pcm, recognize, speech_wav, word_error_rate
from localrt.server import build_local_app

SENTENCES = [
    "Could you book a table for us at the Italian place tonight?",
    "My flight to Chicago leaves on Monday morning.",
    "Please turn off the lights in the kitchen.",
    "How far is it from Paris to Berlin by train?",
    "I need to buy milk, eggs and bread after work.",
    "The meeting has been moved to Thursday afternoon.",
    "What time does the pharmacy close on Sunday?",
    "Remind me to water the plants every evening.",
    "Can you play some quiet music while I read?",
    "Thank you, that is all I wanted to know.",
]


async def test_ten_spoken_sentences_through_the_bridge_are_captioned_with_a_low_word_error_rate(
        start_bridge, new_caller, tmp_path):
    local = web.AppRunner(build_local_app(config.from_raw({})))
    await local.setup()
    await web.TCPSite(local, "127.0.0.1", 0).start()
    try:
        bridge = await start_bridge(f"ws://127.0.0.1:{local.addresses[0][1]}/v1/realtime")
        caller = new_caller(bridge.url)
        await caller.connect()
        await caller.wait_event("session.updated", timeout=15)
        heard: list[str] = []
        reply_heard = ""
        for i, sentence in enumerate(SENTENCES):
            pcm, rate = read_pcm(speech_wav(sentence, tmp_path / f"s{i}.wav", rate=48000, pad_s=1.0))
            assert rate == 48000
            done_before = len(caller.events_of("conversation.item.input_audio_transcription.completed"))
            caller.source.play(pcm)
            for _ in range(300):  # the caption of this sentence (speech + 1 s + decode), 30 s at most
                captions = caller.events_of("conversation.item.input_audio_transcription.completed")
                if len(captions) > done_before:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"no caption for {sentence!r}")
            heard.append(captions[-1]["transcript"])
            if i == 0:  # hear the whole first reply, as the caller's ear gets it
                start = len(caller.audio)
                await caller.next_event("output_audio_buffer.stopped", timeout=30)
                reply_heard = recognize(bytes(caller.audio[start:]), 48000)
        assert await caller.hangup() == 200
        await bridge.wait_no_calls()  # before the backend stops: its socket closes with the call
        wer = word_error_rate(" ".join(SENTENCES), " ".join(heard))
        assert wer <= 0.10, (wer, list(zip(SENTENCES, heard)))
        # The echoed reply ("You said: could you book a table ...") is speech Whisper understands.
        assert {"table", "italian", "tonight", "book"} & set(reply_heard.lower().replace(",", " ").split()), reply_heard
    finally:
        await local.cleanup()
