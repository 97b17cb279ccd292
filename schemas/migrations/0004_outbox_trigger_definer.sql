-- The outbox trigger runs in the shop's sessions, as the shop's database user: as SECURITY
-- DEFINER it writes the outbox with the rights of the bridge's user (its owner), so the shop's
-- user needs no rights in the bridge's schema. Its search_path is fixed (0003), as a definer
-- function's must be.
ALTER FUNCTION record_subscription_change() SECURITY DEFINER;
