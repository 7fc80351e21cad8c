"""Audio only: the inbound mic pump, the outbound playback track, the audio constants."""
