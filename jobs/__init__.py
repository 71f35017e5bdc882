"""Jobs, sensors and automation."""
