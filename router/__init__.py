"""The HTTP face: OpenAI-compatible schemas, validation, safe embeds decoding, replica choice,
streaming, errors and metrics (the Serve ingress is router.app.Router)."""
