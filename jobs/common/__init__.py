"""What every command shares: the console, signals and the run log, progress, failures and bad input, the
Ray session, and the options (configs, --config files, argument checks)."""
