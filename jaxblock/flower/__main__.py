"""`python -m jaxblock.flower` prints the Flower App's directory: `flwr run $(python -m jaxblock.flower)`."""

from jaxblock.flower import APP_DIR

print(APP_DIR)
