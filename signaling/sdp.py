"""Checks on a browser's SDP offer, before aiortc sees it, so errors are precise."""

from __future__ import annotations

import re


class OfferError(ValueError):
    """The offer cannot be answered; the message says why, for the caller."""


_RTPMAP = re.compile(r"^a=rtpmap:(\d+)\s+([A-Za-z0-9_.-]+)/(\d+)", re.IGNORECASE)


def validate_offer(sdp: str) -> None:
    """Raise OfferError unless `sdp` is an SDP offer with an audio m-line offering Opus."""
    lines = [line.strip() for line in sdp.replace("\r\n", "\n").split("\n") if line.strip()]
    if not lines:
        raise OfferError("the SDP offer is empty")
    if lines[0] != "v=0":
        raise OfferError("the body is not an SDP offer (it must start with 'v=0')")
    sections: list[list[str]] = []
    for line in lines:
        if line.startswith("m="):
            sections.append([line])
        elif sections:
            sections[-1].append(line)
    audio = [s for s in sections if s[0].startswith("m=audio ")]
    if not audio:
        raise OfferError("the SDP offer has no audio m-line")
    session_level = lines[: next((i for i, line in enumerate(lines) if line.startswith("m=")), len(lines))]
    for section in audio:
        fields = section[0].split()
        if len(fields) < 4:
            raise OfferError(f"malformed audio m-line: {section[0]!r}")
        if fields[1] == "0":
            continue  # rejected section
        offered = set(fields[3:])
        for line in section[1:]:
            m = _RTPMAP.match(line)
            if m and m.group(2).lower() == "opus" and m.group(3) == "48000" and m.group(1) in offered:
                _check_transport(session_level + section)
                return
    raise OfferError("the SDP offer does not offer the Opus codec for audio")


def _check_transport(attrs: list[str]) -> None:
    """What WebRTC media needs besides a codec: a DTLS fingerprint and ICE credentials
    (without them aiortc answers, then fails in the background)."""
    if not any(a.startswith("a=fingerprint:") for a in attrs):
        raise OfferError("the SDP offer has no DTLS fingerprint (a=fingerprint): WebRTC media needs DTLS-SRTP")
    if not any(a.startswith("a=ice-ufrag:") for a in attrs) or not any(a.startswith("a=ice-pwd:") for a in attrs):
        raise OfferError("the SDP offer has no ICE credentials (a=ice-ufrag and a=ice-pwd)")
