# azd preprovision hook (Windows): the same check as preprovision.sh. Before anything is created,
# every chosen model, version and deployment type (SKU) must be offered in every chosen region, so a
# retired model or a typo stops here with one line naming it instead of failing inside `azd provision`.
# Needs the Azure CLI, logged in (`az login`); without it the check is skipped, and says so. It asks
# about the subscription azd deploys to (AZURE_SUBSCRIPTION_ID), not az's default one. A model listed
# as Deprecating (existing customers only) or retiring within 90 days is a warning, not a stop.
# The defaults below are infra/main.parameters.json's (tests/test_infra.py keeps them equal).
$ErrorActionPreference = 'Stop'

function Get-Setting([string]$Name, [string]$Default) {
    $value = [Environment]::GetEnvironmentVariable($Name)
    if ([string]::IsNullOrEmpty($value)) { return $Default } else { return $value }
}

$wanted = @(
    @{ Which = 'chat'
       Name = Get-Setting 'AZURE_OPENAI_CHATGPT_MODEL' 'gpt-5.4-mini'
       Version = Get-Setting 'AZURE_OPENAI_CHATGPT_DEPLOYMENT_VERSION' '2026-03-17'
       Sku = Get-Setting 'AZURE_OPENAI_CHATGPT_DEPLOYMENT_SKU' 'GlobalStandard'
       Vars = 'AZURE_OPENAI_CHATGPT_MODEL / _DEPLOYMENT_VERSION / _DEPLOYMENT_SKU' },
    @{ Which = 'embedding'
       Name = Get-Setting 'AZURE_OPENAI_EMB_MODEL_NAME' 'text-embedding-3-large'
       Version = Get-Setting 'AZURE_OPENAI_EMB_DEPLOYMENT_VERSION' '1'
       Sku = Get-Setting 'AZURE_OPENAI_EMB_DEPLOYMENT_SKU' 'GlobalStandard'
       Vars = 'AZURE_OPENAI_EMB_MODEL_NAME / _DEPLOYMENT_VERSION / _DEPLOYMENT_SKU' }
)
$locations = Get-Setting 'LB_OPENAI_LOCATIONS' 'eastus,northcentralus,eastus2'
$subscription = Get-Setting 'AZURE_SUBSCRIPTION_ID' ''
$subscriptionArgs = if ($subscription) { @('--subscription', $subscription) } else { @() }
$warnDays = 90

if (-not [string]::IsNullOrEmpty($env:LB_EXISTING_OPENAI_ENDPOINTS)) {
    Write-Output 'preprovision: LB_EXISTING_OPENAI_ENDPOINTS is set, so no Azure OpenAI account is created: model check skipped'
    exit 0
}
if (-not (Get-Command az -ErrorAction SilentlyContinue)) {
    Write-Output "preprovision: Azure CLI (az) not found: model check skipped (install az and run 'az login' to check the models in $locations first)"
    exit 0
}
az account show --output none 2>$null | Out-Null
if ($LASTEXITCODE -ne 0) {
    Write-Output "preprovision: Azure CLI not logged in: model check skipped (run 'az login' to check the models in $locations first)"
    exit 0
}
if ($subscription) {
    az account show --subscription $subscription --output none 2>$null | Out-Null
    if ($LASTEXITCODE -ne 0) {
        Write-Output "preprovision: Azure CLI cannot see subscription $subscription (azd's AZURE_SUBSCRIPTION_ID): model check skipped (run 'az login' with an account that can, to check the models in $locations first)"
        exit 0
    }
}
$warned = @{}

$failed = $false
foreach ($loc in ($locations -split ',' | ForEach-Object { $_.Trim() } | Where-Object { $_ })) {
    $errors = New-TemporaryFile  # az warns on stderr: keep it out of the JSON
    $raw = az cognitiveservices model list --location $loc @subscriptionArgs --output json 2>$errors
    if ($LASTEXITCODE -ne 0) {
        Write-Output "preprovision: cannot list Azure OpenAI models in region '$loc' (LB_OPENAI_LOCATIONS): $(Get-Content $errors | Select-Object -First 1)"
        Remove-Item $errors
        $failed = $true
        continue
    }
    Remove-Item $errors
    $models = @(($raw | Out-String | ConvertFrom-Json) | Where-Object { $_.model.format -eq 'OpenAI' } | ForEach-Object {
        [pscustomobject]@{ Name = $_.model.name; Version = $_.model.version
                           Skus = @($_.model.skus | ForEach-Object { $_.name })
                           Life = "$($_.model.lifecycleStatus)"
                           # ConvertFrom-Json may have made the date a [datetime]: back to yyyy-MM-dd either way
                           Retire = $(if ($_.model.deprecation.inference -is [datetime]) {
                                        $_.model.deprecation.inference.ToUniversalTime().ToString('yyyy-MM-dd')
                                    } else { "$($_.model.deprecation.inference)" })
                           Gone = ("$($_.model.lifecycleStatus)" -match '^(Deprecated|Retir)') }
    })
    foreach ($w in $wanted) {
        $same = @($models | Where-Object { $_.Name -eq $w.Name })
        $exact = @($same | Where-Object { $_.Version -eq $w.Version })
        $withSku = @($exact | Where-Object { $_.Skus -contains $w.Sku })
        $usable = @($withSku | Where-Object { -not $_.Gone })
        if ($usable.Count -gt 0) {
            if ($warned.ContainsKey($w.Which)) { continue }  # one warning per model, not one per region
            $m = $usable[0]
            $retire = if ($m.Retire.Length -ge 10) { $m.Retire.Substring(0, 10) } else { '' }
            if ($m.Life -eq 'Deprecating') {
                $when = if ($retire) { ", retires $retire" } else { '' }
                Write-Output "preprovision: warning: $($w.Which) model $($w.Name) $($w.Version) is Deprecating in $loc (existing customers only$when): a subscription that already deploys it may still; one that does not is refused at provision; change it with azd env set ($($w.Vars))"
                $warned[$w.Which] = $true
            } elseif ($retire) {
                $day = [datetime]::MinValue
                $parsed = [datetime]::TryParseExact($retire, 'yyyy-MM-dd', [Globalization.CultureInfo]::InvariantCulture,
                    [Globalization.DateTimeStyles]::None, [ref]$day)
                $left = ($day - [datetime]::UtcNow.Date).Days
                if ($parsed -and $left -le $warnDays) {
                    Write-Output "preprovision: warning: $($w.Which) model $($w.Name) $($w.Version) retires on $retire ($left days); pick a newer one with azd env set ($($w.Vars))"
                    $warned[$w.Which] = $true
                }
            }
            continue
        }
        if ($withSku.Count -gt 0) { $why = 'deprecated there: no new deployments' }
        elseif ($exact.Count -gt 0) { $why = "not offered as $($w.Sku) there" }
        elseif ($same.Count -gt 0) { $why = "version $($w.Version) not offered there" }
        else { $why = 'model not offered there' }
        $live = @($models | Where-Object { -not $_.Gone -and $_.Life -ne 'Deprecating' })
        $sameLive = @($live | Where-Object { $_.Name -eq $w.Name } | ForEach-Object { "$($_.Version) ($($_.Skus -join ','))" })
        if ($sameLive.Count -gt 0) {
            $instead = "$($w.Name) $($sameLive -join ', ')"
        } else {
            $family = $w.Name.Split('-')[0] + '-'
            $others = @($live | Where-Object { $_.Name.StartsWith($family) -and ($_.Skus -contains $w.Sku) } |
                ForEach-Object { "$($_.Name) $($_.Version)" } | Select-Object -Unique -First 8)
            $instead = if ($others.Count -gt 0) { "$($others -join ', ') ($($w.Sku))" } else { "nothing of that family with $($w.Sku)" }
        }
        Write-Output "preprovision: $($w.Which) model $($w.Name) $($w.Version) $($w.Sku) is missing in $loc ($why); offered instead: $instead; change it with azd env set ($($w.Vars)) or LB_OPENAI_LOCATIONS"
        $failed = $true
    }
}
if ($failed) { exit 1 }
Write-Output "preprovision: the chosen models are offered in $locations"
