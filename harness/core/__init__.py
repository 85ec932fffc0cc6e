"""The floor every layer stands on: one-line errors (cli), the typed config schema (config), the metric vocabulary
(vocabulary), atomic run-folder files (runfolder), checkpoints, the lease that makes one writer per cell, the launch
environment (distributed), compute accounting and the recorded GPU throughput. No torch model is built here."""
