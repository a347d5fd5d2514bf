"""What the benches share: the machine and command line stored beside every figure (`machine`),
percentiles (`stats`), and the servers a bench runs against in child processes or a background
thread (`servers`)."""
