#!/bin/sh
# azd preprovision hook: before anything is created, check that every chosen model, version and
# deployment type (SKU) is offered in every chosen region, so a retired model or a typo stops here
# with one line naming it instead of failing 10 minutes into `azd provision`.
#
# Needs the Azure CLI, logged in (`az login`); without it the check is skipped, and says so. It asks
# about the subscription azd deploys to (AZURE_SUBSCRIPTION_ID), not az's default one.
# A model Azure lists as Deprecating ("existing customers only") is a warning, not a stop: a
# subscription that already deploys it may still; so is a retirement date within 90 days.
# The defaults below are infra/main.parameters.json's (tests/test_infra.py keeps them equal).
set -u

chat_model=${AZURE_OPENAI_CHATGPT_MODEL:-gpt-5.4-mini}
chat_version=${AZURE_OPENAI_CHATGPT_DEPLOYMENT_VERSION:-2026-03-17}
chat_sku=${AZURE_OPENAI_CHATGPT_DEPLOYMENT_SKU:-GlobalStandard}
emb_model=${AZURE_OPENAI_EMB_MODEL_NAME:-text-embedding-3-large}
emb_version=${AZURE_OPENAI_EMB_DEPLOYMENT_VERSION:-1}
emb_sku=${AZURE_OPENAI_EMB_DEPLOYMENT_SKU:-GlobalStandard}
locations=${LB_OPENAI_LOCATIONS:-eastus,northcentralus,eastus2}
subscription=${AZURE_SUBSCRIPTION_ID:-}
warn_days=90

# az_sub ARGS...: az against azd's subscription when azd named one
az_sub() {
  if [ -n "$subscription" ]; then az "$@" --subscription "$subscription"; else az "$@"; fi
}

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
if [ -n "$subscription" ] && ! az account show --subscription "$subscription" --output none >/dev/null 2>&1; then
  echo "preprovision: Azure CLI cannot see subscription $subscription (azd's AZURE_SUBSCRIPTION_ID): model check skipped (run 'az login' with an account that can, to check $chat_model and $emb_model in $locations first)"
  exit 0
fi

# One line per model entry of the region: name, version, SKUs (comma list), lifecycle status,
# inference retirement date (empty when none is set).
query="[?model.format=='OpenAI'].[model.name, model.version, join(',', model.skus[].name || \`[]\`), model.lifecycleStatus, model.deprecation.inference || '']"

# status OFFERED NAME VERSION SKU -> "RESULT<TAB>LIFECYCLE<TAB>RETIREMENT"; RESULT is ok | gone |
# no-sku | no-version | no-model. Deprecated and Retired are gone; Deprecating (existing customers
# only) is ok here and warned about.
status() {
  printf '%s\n' "$1" | awk -F '\t' -v n="$2" -v v="$3" -v s="$4" '
    $1 == n { model = 1 }
    $1 == n && $2 == v {
      version = 1
      k = split($3, skus, ",")
      for (i = 1; i <= k; i++) if (skus[i] == s) { sku = 1; life = $4; retire = $5 }
    }
    END {
      gone = life ~ /^(Deprecated|Retir)/
      if (sku && !gone) r = "ok"; else if (sku) r = "gone"
      else if (version) r = "no-sku"; else if (model) r = "no-version"; else r = "no-model"
      printf "%s\t%s\t%s\n", r, life, retire
    }'
}

# days_until DATE (YYYY-MM-DD...) -> whole days from today (UTC), negative when past; empty input, empty output
days_until() {
  [ -n "$1" ] || return 0
  printf '%s %s\n' "$(date -u +%Y-%m-%d)" "$1" | awk '
    function days(d,   y, m, dd) {
      y = substr(d, 1, 4) + 0; m = substr(d, 6, 2) + 0; dd = substr(d, 9, 2) + 0
      if (m <= 2) { y--; m += 12 }
      return 365 * y + int(y / 4) - int(y / 100) + int(y / 400) + int((153 * (m - 3) + 2) / 5) + dd
    }
    { print days($2) - days($1) }'
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
warned=" "
for loc in $(printf '%s' "$locations" | tr ',' ' '); do
  if ! list=$(az_sub cognitiveservices model list --location "$loc" --query "$query" --output tsv 2>&1); then
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
    found=$(status "$list" "$name" "$version" "$sku")
    result=$(printf '%s' "$found" | cut -f 1)
    if [ "$result" = ok ]; then
      life=$(printf '%s' "$found" | cut -f 2)
      retire=$(printf '%s' "$found" | cut -f 3 | cut -c 1-10)
      left=$(days_until "$retire")
      case $warned in *" $which "*) continue ;; esac  # one warning per model, not one per region
      if [ "$life" = Deprecating ]; then
        echo "preprovision: warning: $which model $name $version is Deprecating in $loc (existing customers only${retire:+, retires $retire}): a subscription that already deploys it may still; one that does not is refused at provision; change it with azd env set ($vars)"
        warned="$warned$which "
      elif [ -n "$left" ] && [ "$left" -le "$warn_days" ]; then
        echo "preprovision: warning: $which model $name $version retires on $retire ($left days); pick a newer one with azd env set ($vars)"
        warned="$warned$which "
      fi
      continue
    fi
    case $result in
      gone) why="deprecated there: no new deployments" ;;
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
