"""The `edge-agent` command (`main.main`, the entry point): parsing arguments, printing, exit
codes (78 for any configuration error); `models` (providers, models list|pull|verify), `watch`
(watch list|run) and `common` (loading the settings, sending one request) beside it. The top of
the house: imports what it runs, each inside its handler so --help stays fast; nothing imports it
but `edge_agent.__main__`. It does no work of its own."""
