"""Test doubles that parley's tests and benchmarks run against: fakes of paid services (`fake_llm`,
`fake_speech`) and the cost-free engine doubles of the plumbing profile (`doubles`)."""
