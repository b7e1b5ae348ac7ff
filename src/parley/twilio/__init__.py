"""Twilio as a telephony channel: the voice webhook answering with TwiML, and call control through
Twilio's REST API. The media stream itself is `parley.transports.twilio` (codec) and
`parley.transports.twilio_wire` (the handler's wire). See docs/twilio.md."""
