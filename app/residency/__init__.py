"""Which adapter is registered on which backend, how recently it was used, how many requests it has
in flight, and which loads or evictions are under way: the shared truth placement decides on."""
