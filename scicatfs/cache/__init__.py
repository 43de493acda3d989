"""The on-disk blob cache and the policy that fills it."""
