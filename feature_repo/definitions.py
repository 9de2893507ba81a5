"""The fusionrank Feast repository: entities, offline sources, feature views and the ranker's FeatureService.

The parquet sources are written per run by `fusionrank.features.materialize_features`, which copies this
file into the run's own repository next to its `data/` folder (FileSource paths are relative to the repo).
Every feature row carries an `event_timestamp` and is computed only from events at or before it, so the
point-in-time join of `get_historical_features` cannot see the future. A row holds the state reached at its
timestamp and stays valid until the entity's next row: the views therefore have no TTL (`ttl=0` = forever).
"""

from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.types import Array, Float32, Float64, Int64, String

product = Entity(
    name="product",
    join_keys=["product_id"],
    value_type=ValueType.STRING,
    description="A catalog product (canonical `products.product_id`).",
)
user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.STRING,
    description="A shopper (canonical `interactions.user_id`).",
)

product_source = FileSource(
    name="product_features_source",
    path="data/product_features.parquet",
    timestamp_field="event_timestamp",
    description="One row per product and change point (catalog time, event times, window expiries).",
)
user_source = FileSource(
    name="user_features_source",
    path="data/user_features.parquet",
    timestamp_field="event_timestamp",
    description="One row per user and event time.",
)

product_features = FeatureView(
    name="product_features",
    entities=[product],
    ttl=timedelta(0),
    schema=[
        Field(name="popularity_7d", dtype=Int64, description="Interactions in the trailing 7 days."),
        Field(name="popularity_30d", dtype=Int64, description="Interactions in the trailing 30 days."),
        Field(name="popularity_all", dtype=Int64, description="Interactions since the data began."),
        Field(
            name="judged_query_count",
            dtype=Int64,
            description="Distinct training queries that judged the product (0 without search data).",
        ),
        Field(name="title_char_count", dtype=Int64, description="Characters in the title."),
        Field(name="title_token_count", dtype=Int64, description="Whitespace tokens in the title."),
        Field(name="category", dtype=String, description="Catalog category, '' where the source has none."),
        Field(name="brand", dtype=String, description="Catalog brand, '' where the source has none."),
    ],
    source=product_source,
    online=True,
    tags={"team": "fusionrank"},
)

user_features = FeatureView(
    name="user_features",
    entities=[user],
    ttl=timedelta(0),
    schema=[
        Field(name="user_event_count", dtype=Int64, description="The user's interactions so far."),
        Field(
            name="user_days_since_prev_event",
            dtype=Float64,
            description="Days between the user's latest interaction and the one before (-1: none before).",
        ),
        Field(
            name="user_recent_products",
            dtype=Array(String),
            description="The user's last product ids, newest first (the BERT context history).",
        ),
    ],
    source=user_source,
    online=True,
    tags={"team": "fusionrank"},
)

product_embedding_source = FileSource(
    name="product_embedding_source",
    path="data/product_embedding.parquet",
    timestamp_field="event_timestamp",
    description="One row per embedded product, written by the bi-encoder step with its model version.",
)

# The bi-encoder's product embeddings, for consumers outside the ranker (the ranker's bundle carries the
# same vectors with the model that made them). Not part of the ranker's FeatureService: a vector is only
# meaningful next to its model, so the server reads the bundle's. Feast's SQLite and Redis online stores
# hold array features; the stores with vector search (e.g. PostgreSQL with pgvector, Milvus, Qdrant) can
# serve nearest-neighbour retrieval over this view once the catalog outgrows an exact scan.
product_embedding = FeatureView(
    name="product_embedding",
    entities=[product],
    ttl=timedelta(0),
    schema=[
        Field(name="embedding", dtype=Array(Float32), description="Unit-length bi-encoder embedding."),
        Field(name="embedding_model", dtype=String, description="The run and model that computed it."),
    ],
    source=product_embedding_source,
    online=True,
    tags={"team": "fusionrank"},
)

# The train/serve contract. A ranker version records the service it was trained through; a change to
# the features the ranker reads is a new service (fusionrank_ranker_v2) declared beside this one, so the
# champion keeps reading what it was trained on.
fusionrank_ranker_v1 = FeatureService(
    name="fusionrank_ranker_v1",
    features=[product_features, user_features],
    description="Features the fusion ranker reads, for training frames and online lookups.",
    tags={"model": "fusionrank-ranker"},
)
