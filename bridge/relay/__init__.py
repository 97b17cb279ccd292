"""The outbox relay (``edrone-bridge relay``): the shop's own table changes, recorded by a
trigger, published as platform events for the trace forwarder."""

from bridge.relay.outbox import Relay, platform_event, serve
from bridge.relay.triggers import install_triggers, notify_channel, trigger_name

__all__ = ["Relay", "install_triggers", "notify_channel", "platform_event", "serve", "trigger_name"]
