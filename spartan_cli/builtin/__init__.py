"""Built-in material shipped with spartan: the paper's two-digit addition model (see ``addition``)."""
