"""PostgreSQL: the schema and its migrations, the engine, and every statement the worker runs
(processed rows, effects single and batch, dead letters, the outbox). Never commits on its
own but where a function says so (``*_now``)."""
