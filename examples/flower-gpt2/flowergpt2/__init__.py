"""A Flower app (Message API) that fine-tunes GPT-2 with FedAvg; `fedrdma = true` moves its arrays with fedrdma."""
