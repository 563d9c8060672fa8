"""Transport, signing, the server and client drivers."""
