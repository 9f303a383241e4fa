"""The replay gate: before a candidate version is promoted, recorded failing conversations are
replayed (up to the failing step) through the project's upstream model with the candidate's
system prompt and with the active one, and each pair is judged."""
