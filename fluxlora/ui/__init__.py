"""`fluxlora ui`: a local web app to prepare datasets, plan, launch and watch training runs.

The UI is a client of the same command line: a run is an ordinary `fluxlora train` process that it starts with an
argv list (never a shell), watches through the run's event log and steers through its control folder
(`fluxlora.training.control`). Job state lives in SQLite on disk, so a run outlives the UI and a new UI re-attaches.
"""
