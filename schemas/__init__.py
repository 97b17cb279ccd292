"""The bridge's contracts: typed message models, their JSON Schema files and the SQL migrations."""

from schemas.subscription import SCHEMA_FILE as SUBSCRIPTION_SCHEMA_FILE
from schemas.subscription import Channel, SubscriptionStatusChanged

__all__ = ["SUBSCRIPTION_SCHEMA_FILE", "Channel", "SubscriptionStatusChanged"]
