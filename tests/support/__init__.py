"""The testing kit, shared by the tests and the benchmarks (bench/ imports it as a package; it
is not part of the installed wheel). One concern a module:

    runner          the real daemon: `sessionsync run` in a subprocess, config, sealed env, log
    notify          a stand-in for systemd's notify socket
    oracle          what the database must hold, read from the files alone, and `converged()`
    snapshot        the database as it is: session rows and events
    databases       fresh databases: SQLite files, a PostgreSQL schema or an emptied database
    proxy           a TCP proxy to cut or slow the daemon's database connections
    inotify_limits  the kernel's inotify limits, lowered by sysctl, stand-in file or namespace
    sessions        session folders written the way agents write them; the example documents
    recorder        what a watcher reports, for watcher tests
    leaks           database connections a test left checked out (conftest fails the test)
    waiting         wait for a condition with a deadline, never for time
"""
