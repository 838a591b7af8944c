"""Pure logic of the llamahost toolkit: profiles, validation, rendering. No pyinfra here."""
