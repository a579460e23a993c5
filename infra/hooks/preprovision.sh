#!/bin/sh
# azd preprovision hook: before anything is created, check that every chosen model, version and
# deployment type (SKU) is offered in every chosen region, so a retired model or a typo stops here
# with one line naming it instead of failing 10 minutes into `azd provision`.
#
# Needs the Azure CLI, logged in (`az login`); without it the check is skipped, and says so.
# The defaults below are infra/main.parameters.json's (tests/test_infra.py keeps them equal).
set -u

chat_model=${AZURE_OPENAI_CHATGPT_MODEL:-gpt-5.4-mini}
chat_version=${AZURE_OPENAI_CHATGPT_DEPLOYMENT_VERSION:-2026-03-17}
chat_sku=${AZURE_OPENAI_CHATGPT_DEPLOYMENT_SKU:-GlobalStandard}
emb_model=${AZURE_OPENAI_EMB_MODEL_NAME:-text-embedding-3-large}
emb_version=${AZURE_OPENAI_EMB_DEPLOYMENT_VERSION:-1}
emb_sku=${AZURE_OPENAI_EMB_DEPLOYMENT_SKU:-GlobalStandard}
locations=${LB_OPENAI_LOCATIONS:-eastus,northcentralus,eastus2}

if [ -n "${LB_EXISTING_OPENAI_ENDPOINTS:-}" ]; then
  echo "preprovision: LB_EXISTING_OPENAI_ENDPOINTS is set, so no Azure OpenAI account is created: model check skipped"
  exit 0
fi
if ! command -v az >/dev/null 2>&1; then
  echo "preprovision: Azure CLI (az) not found: model check skipped (install az and run 'az login' to check $chat_model and $emb_model in $locations first)"
  exit 0
fi
if ! az account show --output none >/dev/null 2>&1; then
  echo "preprovision: Azure CLI not logged in: model check skipped (run 'az login' to check $chat_model and $emb_model in $locations first)"
  exit 0
fi

# One line per model entry of the region: name, version, SKUs (comma list), lifecycle status.
query="[?model.format=='OpenAI'].[model.name, model.version, join(',', model.skus[].name || \`[]\`), model.lifecycleStatus]"

# status OFFERED NAME VERSION SKU -> ok | deprecated | no-sku | no-version | no-model
status() {
  printf '%s\n' "$1" | awk -F '\t' -v n="$2" -v v="$3" -v s="$4" '
    $1 == n { model = 1 }
    $1 == n && $2 == v {
      version = 1
      k = split($3, skus, ",")
      for (i = 1; i <= k; i++) if (skus[i] == s) sku = 1
      if ($4 ~ /^(Deprecat|Retir)/) gone = 1
    }
    END {
      if (sku && !gone) print "ok"; else if (sku) print "deprecated"
      else if (version) print "no-sku"; else if (model) print "no-version"; else print "no-model"
    }'
}

# offered OFFERED NAME SKU -> what the region offers instead: NAME's other versions, else models of that family with SKU
offered() {
  printf '%s\n' "$1" | awk -F '\t' -v n="$2" -v s="$3" '
    $4 ~ /^(Deprecat|Retir)/ { next }
    $1 == n { same = same sep $2 " (" $3 ")"; sep = ", " }
    index($1, family) == 1 && ("," $3 ",") ~ ("," s ",") && !($1 in seen) { seen[$1] = 1; if (others_n < 8) { others = others osep $1 " " $2; osep = ", "; others_n++ } }
    BEGIN { family = substr(n, 1, index(n "-", "-")) }
    END {
      if (same != "") print n " " same
      else if (others != "") print others " (" s ")"
      else print "nothing of that family with " s
    }'
}

failed=0
for loc in $(printf '%s' "$locations" | tr ',' ' '); do
  if ! list=$(az cognitiveservices model list --location "$loc" --query "$query" --output tsv 2>&1); then
    echo "preprovision: cannot list Azure OpenAI models in region '$loc' (LB_OPENAI_LOCATIONS): $(printf '%s' "$list" | head -n 1)"
    failed=1
    continue
  fi
  for which in chat embedding; do
    if [ "$which" = chat ]; then
      name=$chat_model version=$chat_version sku=$chat_sku vars="AZURE_OPENAI_CHATGPT_MODEL / _DEPLOYMENT_VERSION / _DEPLOYMENT_SKU"
    else
      name=$emb_model version=$emb_version sku=$emb_sku vars="AZURE_OPENAI_EMB_MODEL_NAME / _DEPLOYMENT_VERSION / _DEPLOYMENT_SKU"
    fi
    result=$(status "$list" "$name" "$version" "$sku")
    [ "$result" = ok ] && continue
    case $result in
      deprecated) why="deprecated there: no new deployments" ;;
      no-sku) why="not offered as $sku there" ;;
      no-version) why="version $version not offered there" ;;
      *) why="model not offered there" ;;
    esac
    echo "preprovision: $which model $name $version $sku is missing in $loc ($why); offered instead: $(offered "$list" "$name" "$sku"); change it with azd env set ($vars) or LB_OPENAI_LOCATIONS"
    failed=1
  done
done

if [ "$failed" -ne 0 ]; then
  exit 1
fi
echo "preprovision: $chat_model $chat_version $chat_sku and $emb_model $emb_version $emb_sku are offered in $locations"
