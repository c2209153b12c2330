"""Files installed with edgeway for running it as a service (the systemd unit)."""
