"""The Realtime protocol side: events, the upstream client, the page policy, the call."""
