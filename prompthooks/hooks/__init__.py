"""Hook bodies: what happens to a forward call's arguments and outputs."""
