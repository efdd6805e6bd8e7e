"""Real USB: finding EEM interfaces (sysfs), choosing one, claiming it through libusb."""
