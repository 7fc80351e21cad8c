"""Per-call Opus negotiation: in-band FEC and RED in our SDP answer.

A browser's Opus encoder takes its settings from the *answer's* fmtp line:
`useinbandfec=1` turns its in-band FEC on (sized from the loss our RTCP
receiver reports show), and it sends RED (RFC 2198) only when `red/48000/2` is
the first payload type of the answer's audio m-line. aiortc answers with its own
process-wide codec list, which has no fmtp for Opus and no RED at all.

aiortc keeps the negotiated codecs per transceiver (`transceiver._codecs`, deep
copies of its global list), and the answer, the receiver's payload-type table
and the sender's codec all come from that list. So editing that list between
`setRemoteDescription` and `createAnswer` negotiates per call and touches no
other call (aiortc's global `CODECS` stays as it is). RED goes first, as Chrome
needs; the sender then sends with RED's payload type, which is why the call's
own packer (`media/downlink.py`) takes aiortc's encoder slot.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Optional

from aiortc import RTCRtpTransceiver
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

logger = logging.getLogger(__name__)

#: What we ask of the browser's encoder: 10 ms frames allowed, in-band FEC on.
OPUS_FMTP = {"minptime": 10, "useinbandfec": 1}


@dataclass(frozen=True)
class AudioCodecs:
    """Payload types this call uses; red_pt is None when RED was not negotiated."""

    opus_pt: int
    red_pt: Optional[int] = None


def _offered_red(offer_sdp: str, mid: Optional[str], opus_pt: int) -> Optional[int]:
    """The payload type of RED in the offer's audio section for `mid`, if it carries Opus."""
    section: list[str] = []
    for block in re.split(r"\r?\n(?=m=)", offer_sdp):
        if block.startswith("m=audio") and (mid is None or re.search(rf"^a=mid:{re.escape(mid)}\s*$", block, re.M)):
            section = block.splitlines()
            break
    red_pts = [int(m.group(1)) for line in section if (m := re.match(r"a=rtpmap:(\d+) red/48000/2\s*$", line, re.I))]
    for pt in red_pts:
        fmtp = next((line.split(" ", 1)[1].strip() for line in section if line.startswith(f"a=fmtp:{pt} ")), "")
        if fmtp and all(p == str(opus_pt) for p in fmtp.split("/")):
            return pt
    return None


def configure(transceiver: RTCRtpTransceiver, offer_sdp: str, *, red: bool = True,
              browser_bitrate: int = 0) -> Optional[AudioCodecs]:
    """Set this call's audio codecs. Call after setRemoteDescription, before createAnswer.
    `browser_bitrate` (bits/s, 0: the browser's default, 32 kb/s for mono in Chrome) goes
    in the answer as `maxaveragebitrate`, which Chrome's encoder takes as its bitrate.
    Returns None if Opus was not negotiated (nothing is changed then)."""
    codecs: list[RTCRtpCodecParameters] = transceiver._codecs
    opus = next((c for c in codecs if c.mimeType.lower() == "audio/opus"), None)
    if opus is None:
        return None
    opus.parameters = dict(OPUS_FMTP)
    if browser_bitrate:
        opus.parameters["maxaveragebitrate"] = browser_bitrate
    others = [c for c in codecs if c is not opus]
    red_pt = _offered_red(offer_sdp, transceiver.mid, opus.payloadType) if red else None
    ordered = [opus, *others]
    if red_pt is not None:
        red_codec = RTCRtpCodecParameters(mimeType="audio/red", clockRate=48000, channels=2, payloadType=red_pt,
                                          parameters={f"{opus.payloadType}/{opus.payloadType}": None})
        ordered.insert(0, red_codec)
    transceiver._codecs = ordered
    return AudioCodecs(opus.payloadType, red_pt)
