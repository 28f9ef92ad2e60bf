"""IoT predictive maintenance: machines, their sensor readings, and whether each fails within the next hours."""
