"""Health is data: the retained status document (`status.StatusBoard`), the periodic stats
(`stats`), publishing both (`reports.Reports`), and what systemd hears (`systemd`: READY,
RELOADING, STOPPING, watchdog pings).

Reads the parts through functions it is given (`Reports` takes a snapshot getter and info
functions). Never imports `work/`, `automation/`, `daemon/` or paho.
"""
