"""The daemon: `main.run` (signals, the main loop, systemd, reload on file change or SIGHUP),
`app.Agent` (builds the parts, starts them in order, stops them in reverse, and applies a new
settings snapshot by swapping one `work.snapshot.Snapshot`), `parts` (what a snapshot's
settings make: request limits, the engine, the store), `reload` (which parts a change touches,
the config-file watcher).

The top of the house: everything below is wired here and never imports it. Only `cli/` imports it.
"""
