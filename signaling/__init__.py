"""aiohttp signaling: SDP offer/answer, hangup, health, the page; errors, CORS, limits."""
