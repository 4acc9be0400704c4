"""Automation: work the agent gives itself. Watch rules (`watch.Watcher`: timed and motion
runs, retained rule state, change events) and Home Assistant (`homeassistant`: the pure
discovery document; `ha_bridge`: announcing it, prompts from HA's text entity).

Both submit work through the intake's door (a function they are given) and publish through
the current snapshot's link. Never imports `daemon/` or `cli/`, and never the Agent.
"""
